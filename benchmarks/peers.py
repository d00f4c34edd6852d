"""The systems `luffy bench` times, one runner class per system.

Every runner reads the same weights (the luffy artifact, or the Hugging Face directory it was compiled
from) and generates greedily with end-of-sequence stopping disabled, so each run produces exactly the
requested number of tokens. A runner lives in its own worker process (see worker.py):

    build()     one-shot, in a throwaway worker: compile / export / run the model builder; timed
    load()      in the measuring worker: open the model, report its weight bytes
    generate()  one timed run; calls ``first_token()`` the moment the first new token exists

(runner.py defines that interface; native_peers.py holds the peers that run outside luffy's Python.)

Nothing here imports torch or onnxruntime at module level: the parent process only asks
``unavailable()`` whether a system can run at all.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import luffy

from ..errors import UsageError
from ..measure import engine_generate
from ..runtimes import share_thread_pool

from .native_peers import NATIVE_RUNNERS
from .runner import Runner, onnx_weight_bytes

SUBJECT = "luffy"
PEERS = ("torch", "ort-export", "genai", "genai-int4", "luffy-int4", "llama.cpp", "openvino", "ctranslate2")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 3)


# -- luffy ----------------------------------------------------------------------------------------------
class LuffyRunner(Runner):
    """The artifact on luffy's ORT engine (IO binding, preallocated KV cache), as `luffy.load` gives it."""

    name = SUBJECT
    needs_hf_dir = False

    def build(self) -> dict:
        if not self.paths.get("compile_source"):
            return {}
        result = {}

        def compile_it():
            result["artifact"] = luffy.compile(
                self.paths["compile_source"], output=self.paths["artifact"], opt_level=self.paths.get("opt_level", 2),
            )

        seconds = _timed(compile_it)
        return {"build_s": seconds, "parity": result["artifact"].report.get("parity")}

    def load(self) -> dict:
        return self._load(self.paths["artifact"])

    def _load(self, artifact: str) -> dict:
        self.engine = luffy.load(artifact)
        manifest = self.engine.manifest
        if manifest.get("kind") != "causal-lm":
            raise UsageError(f"{artifact}: luffy bench times causal LMs; this artifact is {manifest.get('kind')!r}")
        weights = onnx_weight_bytes(Path(artifact) / manifest["model_file"])
        return {
            **weights, "vocab": self.engine.vocab, "max_seq_len": self.engine.max_seq_len,
            "label": f"luffy -O{manifest.get('opt_level')} {manifest.get('precision')}",
            "threads": self.engine.thread_pool["threads"], "thread_pool": self.engine.thread_pool,
            "huge_pages": self.engine.huge_pages,
        }

    generate_kwargs: dict = {}  # what a subclass adds to every generate call

    def generate(self, ids, new_tokens, first_token):
        tokens = engine_generate(self.engine, ids, new_tokens, first_token, **self.generate_kwargs)
        self.last_stats = self.engine.generation_stats  # speculative decoding's acceptance, else None
        return tokens


class LuffySpeculativeRunner(LuffyRunner):
    """The same artifact generating with speculative decoding (a subclass says which source). Greedy output is
    identical to plain luffy's (the report's tokens_agree_with_luffy checks it). Rows are verified one after
    another: at batch > 1 the first token timed is the first row's."""

    def load(self) -> dict:
        info = self._load(self.paths["artifact"])
        label, self.generate_kwargs = self._speculation()
        info["label"] += label
        return info


class LuffyDraftRunner(LuffySpeculativeRunner):
    """``paths["draft"]``: a draft artifact, e.g. the int8 build."""

    name = "luffy-draft"

    def _load(self, path):
        share_thread_pool()  # this worker runs only this system: one ORT pool for target and draft
        return super()._load(path)

    def _speculation(self) -> tuple[str, dict]:
        draft = luffy.load(self.paths["draft"])
        return f" + draft {draft.manifest.get('precision')}", {"assistant_model": draft}


class LuffyLookupRunner(LuffySpeculativeRunner):
    """``paths["prompt_lookup"]``: K, the most tokens proposed per round."""

    name = "luffy-lookup"

    def _speculation(self) -> tuple[str, dict]:
        k = int(self.paths["prompt_lookup"])
        return f" + prompt lookup {k}", {"prompt_lookup_num_tokens": k}


# -- transformers eager -----------------------------------------------------------------------------------
class TorchRunner(Runner):
    """transformers eager fp32 on the same HF directory: ``model.generate`` greedy, torch's default threads."""

    name = "torch"

    @classmethod
    def unavailable(cls):
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        return f"{' and '.join(missing)} not installed (pip install 'luffy[compile]')" if missing else None

    def load(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            self.paths["hf_dir"], dtype=torch.float32, local_files_only=True, trust_remote_code=False,
        ).eval()
        params = {id(p): p for p in self.model.parameters()}  # tied weights once
        total = sum(p.numel() * p.element_size() for p in params.values())
        embedding = self.model.get_input_embeddings().weight
        output = self.model.get_output_embeddings()
        tied = output is not None and output.weight is embedding
        streamed = total - (0 if tied else embedding.numel() * embedding.element_size())
        return {
            "weight_bytes": total, "streamed_weight_bytes": streamed, "vocab": self.model.config.vocab_size,
            "label": f"transformers {_version('transformers')} eager fp32", "threads": torch.get_num_threads(),
        }

    def generate(self, ids, new_tokens, first_token):
        torch = self.torch

        class FirstToken:  # transformers' streamer protocol: put(prompt), then put(token) per step
            calls = 0

            def put(self, value):
                FirstToken.calls += 1
                if FirstToken.calls == 2:
                    first_token()

            def end(self):
                pass

        input_ids = torch.from_numpy(ids)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0, streamer=FirstToken(),
            )
        return out[0, ids.shape[1]:].tolist()


# -- plain torch.onnx export + ORT ----------------------------------------------------------------------
class OrtExportRunner(Runner):
    """What a user assembles without luffy: ``torch.onnx.export(dynamo=True)`` of the model with its KV
    cache as graph I/O, run on an ORT session with default options by a numpy loop (``session.run``, no
    IO binding; the cache is whatever ``present`` the last step returned, i.e. concatenated per step)."""

    name = "ort-export"

    @classmethod
    def unavailable(cls):
        missing = [m for m in ("torch", "transformers", "onnxscript") if importlib.util.find_spec(m) is None]
        return f"{' and '.join(missing)} not installed (pip install 'luffy[compile]')" if missing else None

    def build(self) -> dict:
        start = time.perf_counter()  # timed like luffy.compile: imports, loading the weights, export, save
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache

        out = Path(self.paths["build_dir"]) / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(self.paths["hf_dir"], dtype=torch.float32, local_files_only=True).eval()
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters

        # Its own step wrapper, not luffy's capture (compiler/capture/torch_export.py): this peer is what a user
        # assembles without luffy, so it shares none of luffy's code.
        class Step(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, past):
                cache = DynamicCache()
                for layer in range(len(past) // 2):
                    cache.update(past[2 * layer], past[2 * layer + 1], layer)
                extra = {"position_ids": position_ids} if takes_positions else {}
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                 use_cache=True, **extra)
                present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
                return (out.logits, *present)

        with torch.no_grad():  # one forward to learn the cache's shape, then an example with 4 past tokens
            probe = model(input_ids=torch.zeros((1, 2), dtype=torch.long), past_key_values=DynamicCache(), use_cache=True)
        shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in probe.past_key_values.layers]
        batch, seq, past_len, past_n = 2, 3, 4, len(shapes)
        past = [torch.randn(batch, heads, past_len, dim) for heads, dim in shapes for _ in (0, 1)]
        args = (
            torch.randint(0, 100, (batch, seq)), torch.ones(batch, past_len + seq, dtype=torch.long),
            torch.arange(past_len, past_len + seq).repeat(batch, 1), past,
        )
        b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
        dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
                   "past": [{0: b, 2: p}] * (2 * past_n)}
        names = [f"{layer}.{kind}" for layer in range(past_n) for kind in ("key", "value")]
        torch.onnx.export(
            Step().eval(), args, str(out), dynamo=True, dynamic_shapes=dynamic,
            input_names=["input_ids", "attention_mask", "position_ids", *(f"past.{n}" for n in names)],
            output_names=["logits", *(f"present.{n}" for n in names)],
        )
        return {"build_s": round(time.perf_counter() - start, 3)}

    def load(self) -> dict:
        path = Path(self.paths["build_dir"]) / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [name for name in self.inputs if name.startswith("past.")]
        vocab = self.session.get_outputs()[0].shape[-1]
        return {**onnx_weight_bytes(path), "vocab": vocab, "label": f"torch.onnx export + ORT {ort.__version__} loop",
                "threads": "ORT default"}

    def generate(self, ids, new_tokens, first_token):
        batch, prompt = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, prompt), np.int64),
                 "position_ids": np.tile(np.arange(prompt, dtype=np.int64), (batch, 1))}
        for name in self.past:
            shape = self.inputs[name].shape
            feeds[name] = np.zeros((batch, shape[1], 0, shape[3]), np.float32)
        tokens = []
        for step in range(new_tokens):
            outputs = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})
            token = outputs[0][:, -1, :].argmax(-1)
            tokens.append(int(token[0]))
            if step == 0:
                first_token()
            length = prompt + step + 1
            feeds = {"input_ids": token[:, None].astype(np.int64), "attention_mask": np.ones((batch, length), np.int64),
                     "position_ids": np.full((batch, 1), length - 1, np.int64), **dict(zip(self.past, outputs[1:]))}
        return tokens


class LuffyInt4Runner(LuffyRunner):
    """luffy's int4 build of the same HF directory (MatMulNBits with the int4 defaults: this CPU's block size,
    clipped RTN), set beside onnxruntime-genai's int4 build so the quantized comparison is part of the same run."""

    name = "luffy-int4"
    needs_hf_dir = True

    def build(self) -> dict:
        seconds = _timed(lambda: luffy.compile(
            self.paths["hf_dir"], output=self.paths["build_dir"], precision="int4", opt_level=self.paths.get("opt_level", 2),
        ))
        return {"build_s": seconds}

    def load(self) -> dict:
        return self._load(self.paths["build_dir"])


# -- onnxruntime-genai -------------------------------------------------------------------------------------
class GenaiRunner(Runner):
    """onnxruntime-genai: its model builder run on the same HF directory (``-e cpu``), its own generator loop."""

    name = "genai"
    precision = "fp32"

    @classmethod
    def unavailable(cls):
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "onnxruntime-genai not installed (pip install 'luffy[bench]')"
        return None

    def build(self) -> dict:
        out = Path(self.paths["build_dir"])
        out.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(self.paths["hf_dir"]), "-o", str(out),
            "-p", self.precision, "-e", "cpu", "-c", str(out / "cache"),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds = round(time.perf_counter() - start, 3)
        sys.stderr.write(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not (out / "genai_config.json").is_file():
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise RuntimeError(f"model builder exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
        return {"build_s": seconds}

    def load(self) -> dict:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(self.paths["build_dir"]))
        config = json.loads((Path(self.paths["build_dir"]) / "genai_config.json").read_text())["model"]
        weights = onnx_weight_bytes(Path(self.paths["build_dir"]) / config["decoder"]["filename"])
        return {**weights, "vocab": config["vocab_size"], "max_seq_len": config.get("context_length"),
                "label": f"onnxruntime-genai {_version('onnxruntime-genai')} {self.precision}", "threads": "genai default"}

    def generate(self, ids, new_tokens, first_token):
        og = self.og
        batch, prompt = ids.shape
        params = og.GeneratorParams(self.model)
        # min_length = max_length: EOS cannot end the run early.
        params.set_search_options(max_length=prompt + new_tokens, min_length=prompt + new_tokens, do_sample=False,
                                  batch_size=batch)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))  # prefill
        generator.generate_next_token()  # picks the first token from the prefill's logits
        first_token()
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)[prompt:]]


class GenaiInt4Runner(GenaiRunner):
    """onnxruntime-genai's int4 build (MatMulNBits, block 32, CPU accuracy level 4): the quantized reference."""

    name = "genai-int4"
    precision = "int4"


RUNNERS: dict[str, type[Runner]] = {
    cls.name: cls for cls in (LuffyRunner, TorchRunner, OrtExportRunner, GenaiRunner, GenaiInt4Runner, LuffyInt4Runner,
                              LuffyDraftRunner, LuffyLookupRunner, *NATIVE_RUNNERS)
}


def _version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "?"
