"""The CPU peers that run outside luffy's Python: llama.cpp (its binaries), and CTranslate2 and OpenVINO GenAI,
each in a Python of its own (its venv), so none of their dependencies (a different transformers, a CUDA
torch) ever meets luffy's.

Each is found where ``luffy bench --peer NAME=PATH`` says (llama.cpp: its build's bin directory or llama-bench
itself; the others: a Python interpreter that imports the peer), else on PATH (llama-bench) or in luffy's own
Python; a peer found nowhere is skipped with one line saying how to install it. Every peer builds the
precision of the artifact being benched from the same Hugging Face directory:

    luffy      llama.cpp (GGUF)   CTranslate2        OpenVINO (optimum-cli --weight-format)
    fp32       f32                float32            fp32
    int8       q8_0               int8_float32       int8
    int4       q4_0               (none: skipped)    int4

llama.cpp is timed by its own ``llama-bench`` (a prompt of P tokens, then N tokens generated on top of a P-token
context, one repetition per timed run), so it runs at batch 1 only and reports no tokens. The Python peers
run ``peer_driver.py`` under their interpreter, which times each generation inside that process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..runtimes.cpu_features import usable_cores
from .runner import Runner

INSTALL = {
    "llama.cpp": "build llama.cpp (docs/benchmarks.md: llama-bench, llama-quantize, convert_hf_to_gguf.py) and pass "
                 "--peer llama.cpp=BUILD/bin, or put llama-bench on PATH",
    "ctranslate2": "python -m venv --system-site-packages V && V/bin/pip install ctranslate2; then --peer "
                   "ctranslate2=V/bin/python",
    "openvino": "python -m venv --system-site-packages V && V/bin/pip install openvino-genai openvino-tokenizers "
                "'optimum-intel[openvino]' 'transformers<5.6'; then --peer openvino=V/bin/python",
}
LLAMA_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def artifact_precision(paths: dict) -> str:
    """The precision of the artifact being benched (a model source the bench compiles first: fp32)."""
    manifest = Path(paths["artifact"]) / "manifest.json"
    if paths.get("compile_source") and not manifest.is_file():
        return "fp32"
    return json.loads(manifest.read_text()).get("precision", "fp32")


def _run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])  # the worker's log
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"{what} exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    return proc


# -- llama.cpp ---------------------------------------------------------------------------------------------
def llama_cpp_bin(given: str | None, binary: str = "llama-bench") -> Path | None:
    """The directory holding ``binary``: ``given`` (that directory, or a file in it), else PATH."""
    if given:
        path = Path(given)
        path = path.parent if path.is_file() else path
        return path if (path / binary).is_file() else None
    found = shutil.which(binary)
    return Path(found).resolve().parent if found else None


def llama_cpp_tree(bin_dir: Path) -> Path | None:
    """The source tree with convert_hf_to_gguf.py: above a CMake build's bin directory."""
    for folder in (bin_dir, *bin_dir.parents[:3]):
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    return None


# Two things luffy's byte tokenizer (a BPE over 256 bytes, no merges) lacks that llama.cpp needs: a pre-tokenizer
# hash it knows (a byte-level BPE is GPT-2's kind) and at least one merge (one of two special tokens, which no
# text ever forms, so tokenization is unchanged). Real models' tokenizers have both and are left alone.
# The Llama converter tries SentencePiece first and, in recent trees, imports sentencepiece before it looks for
# tokenizer.model: without that file the attempt ends as the FileNotFoundError the converter expects (and falls
# back to tokenizer.json), so luffy's Python needs no sentencepiece.
_CONVERT = """
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
import conversion.base, convert_hf_to_gguf, gguf
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sentencepiece_vocab = conversion.base.TextModel._create_vocab_sentencepiece
def sentencepiece_if_there(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return sentencepiece_vocab(self)
conversion.base.TextModel._create_vocab_sentencepiece = sentencepiece_if_there
specials = [t["content"] for t in json.load(open(sys.argv[2] + "/tokenizer.json")).get("added_tokens", [])]
add_to_gguf = gguf.SpecialVocab.add_to_gguf
def with_a_merge(self, writer, quiet=False):
    if not self.merges and len(specials) >= 2:
        self.merges = [specials[0] + " " + specials[1]]
    return add_to_gguf(self, writer, quiet)
gguf.SpecialVocab.add_to_gguf = with_a_merge
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def convert_to_gguf(tree: Path, hf_dir: Path, out: Path) -> list[str]:
    """``hf_dir`` as an f32 GGUF at ``out`` by the tree's convert_hf_to_gguf.py (with the byte-tokenizer
    workaround above); the command run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", _CONVERT, str(tree), str(hf_dir), "--outfile", str(out), "--outtype", "f32"]
    _run(command, "convert_hf_to_gguf.py", env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": ""})
    return command


def quantize_gguf(bin_dir: Path, f32: Path, out: Path, gguf_type: str) -> list[str]:
    """``f32`` quantized to ``gguf_type`` (q8_0, q4_0, ...) at ``out`` by llama-quantize; the command run."""
    command = [str(bin_dir / "llama-quantize"), str(f32), str(out), gguf_type.upper()]
    _run(command, "llama-quantize")
    return command


class LlamaCppRunner(Runner):
    """llama.cpp: convert_hf_to_gguf.py (f32) and llama-quantize to the artifact's precision, timed by llama-bench."""

    name = "llama.cpp"
    max_batch = 1

    @classmethod
    def unavailable_with(cls, paths: dict) -> str | None:
        bin_dir = llama_cpp_bin(paths.get("peer_path"))
        if bin_dir is None:
            return f"llama.cpp not found: {INSTALL[cls.name]}"
        if llama_cpp_tree(bin_dir) is None:
            return f"llama.cpp's convert_hf_to_gguf.py not found above {bin_dir}: {INSTALL[cls.name]}"
        if artifact_precision(paths) not in LLAMA_TYPES:
            return f"no GGUF type matches luffy {artifact_precision(paths)} (llama.cpp: {', '.join(LLAMA_TYPES)})"
        return None

    def _files(self) -> tuple[Path, Path, Path]:
        bin_dir = llama_cpp_bin(self.paths.get("peer_path"))
        out = Path(self.paths["build_dir"])
        return bin_dir, out / "model-f32.gguf", out / f"model-{LLAMA_TYPES[artifact_precision(self.paths)]}.gguf"

    def build(self) -> dict:
        bin_dir, f32, final = self._files()
        start = time.perf_counter()
        convert_to_gguf(llama_cpp_tree(bin_dir), Path(self.paths["hf_dir"]), f32)
        if final != f32:
            quantize_gguf(bin_dir, f32, final, final.stem.split("-")[-1])
        return {"build_s": round(time.perf_counter() - start, 3)}

    def load(self) -> dict:
        bin_dir, _, model = self._files()
        self.bench, self.model = bin_dir / "llama-bench", model
        version = _run([str(self.bench), "--version"], "llama-bench --version").stderr.split("version:")[-1].split()
        size = model.stat().st_size
        return {"weight_bytes": size, "streamed_weight_bytes": size - _gguf_embedding_bytes(model, bin_dir),
                "label": f"llama.cpp {LLAMA_TYPES[artifact_precision(self.paths)]} (llama-bench "
                         f"{version[0] if version else '?'})", "threads": usable_cores(), "vocab": None}

    def peak_rss_bytes(self) -> int:
        """The largest llama-bench process's peak RSS (ru_maxrss of waited-for children: at exec a child's
        high-water mark starts from the worker's resident size, so this bounds it from above)."""
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    def _bench(self, prompt: int, generate: int, depth: int) -> float:
        """Seconds of one llama-bench test (one repetition, after llama-bench's own warm-up run)."""
        proc = _run([str(self.bench), "-m", str(self.model), "-p", str(prompt), "-n", str(generate), "-d", str(depth),
                     "-r", "1", "-t", str(usable_cores()), "-o", "json"], "llama-bench")
        [test] = json.loads(proc.stdout)
        return test["samples_ns"][0] / 1e9

    def timed_run(self, ids, new_tokens: int) -> dict:
        prompt = ids.shape[1]
        prefill = self._bench(prompt, 0, 0)
        decode = self._bench(0, new_tokens, prompt)  # N tokens on top of a prompt-long context
        # the bench's decode rate is (N - 1) tokens over (total - ttft): llama-bench's per-token rate, kept
        return {"ttft_s": prefill, "total_s": prefill + decode * (new_tokens - 1) / new_tokens, "tokens": None}

    def generate(self, ids, new_tokens, first_token):
        raise NotImplementedError("llama.cpp is timed by llama-bench (timed_run)")


def _gguf_embedding_bytes(model: Path, bin_dir: Path) -> int:
    """Bytes of the token-embedding table (read one row per token, not streamed), via the tree's gguf-py."""
    tree = llama_cpp_tree(bin_dir)
    sys.path.insert(0, str(tree / "gguf-py"))
    try:
        from gguf import GGUFReader

        return sum(int(t.n_bytes) for t in GGUFReader(str(model)).tensors if t.name == "token_embd.weight")
    finally:
        sys.path.remove(str(tree / "gguf-py"))


# -- the Python peers --------------------------------------------------------------------------------------
def peer_python(given: str | None, module: str) -> str | None:
    """The interpreter that runs a Python peer: ``given``, else luffy's own when it imports ``module``."""
    if given:
        return given if Path(given).is_file() and os.access(given, os.X_OK) else None
    return sys.executable if importlib.util.find_spec(module) is not None else None


class PythonPeerRunner(Runner):
    """A peer in a Python of its own: converted by its own tools, generated by peer_driver.py in that Python."""

    module = ""  # what the peer's Python must import
    formats: dict[str, str] = {}  # luffy precision -> the peer's

    @classmethod
    def unavailable_with(cls, paths: dict) -> str | None:
        python = peer_python(paths.get("peer_path"), cls.module)
        if python is None:
            return f"{cls.name} not found: {INSTALL[cls.name]}"
        probe = subprocess.run([python, "-c", f"import {cls.module}"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"{python} cannot import {cls.module}: {INSTALL[cls.name]}"
        if artifact_precision(paths) not in cls.formats:
            return f"{cls.name} has no format for luffy {artifact_precision(paths)} ({', '.join(cls.formats)} only)"
        return None

    @property
    def python(self) -> str:
        return peer_python(self.paths.get("peer_path"), self.module)

    def load(self) -> dict:
        driver = Path(__file__).with_name("peer_driver.py")
        self.proc = subprocess.Popen([self.python, str(driver), self.name, self.paths["build_dir"], str(usable_cores())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        info = json.loads(self.proc.stdout.readline() or "{}")
        if not info:
            raise RuntimeError(f"{self.name}: peer_driver.py exited {self.proc.wait()} before loading (see the log)")
        size = sum(f.stat().st_size for f in Path(self.paths["build_dir"]).rglob("*") if f.is_file())
        return {"weight_bytes": size, "streamed_weight_bytes": None, "vocab": info.get("vocab"),
                "label": f"{info['label']} {self.formats[artifact_precision(self.paths)]}", "threads": info["threads"]}

    def timed_run(self, ids, new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids.tolist(), "new_tokens": new_tokens}) + "\n")
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"{self.name}: peer_driver.py exited {self.proc.wait()} (see the log)")
        return json.loads(reply)

    def peak_rss_bytes(self) -> int:
        """The driver's peak RSS (VmHWM), read while it is alive: the peer's own memory."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

    def generate(self, ids, new_tokens, first_token):
        raise NotImplementedError(f"{self.name} is timed inside its own Python (timed_run)")


class CTranslate2Runner(PythonPeerRunner):
    """CTranslate2: ct2-transformers-converter on the HF directory, its Generator greedy."""

    name, module = "ctranslate2", "ctranslate2"
    formats = {"fp32": "float32", "int8": "int8_float32"}

    def build(self) -> dict:
        out = Path(self.paths["build_dir"])
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        _run([self.python, "-m", "ctranslate2.converters.transformers", "--model", str(self.paths["hf_dir"]),
              "--output_dir", str(out), "--quantization", self.formats[artifact_precision(self.paths)]],
             "ct2-transformers-converter", env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _special_tokens_from_config(out, Path(self.paths["hf_dir"]))
        return {"build_s": round(time.perf_counter() - start, 3)}


def _special_tokens_from_config(ct2_dir: Path, hf_dir: Path) -> None:
    """The converter takes bos/eos from the tokenizer's special tokens; a tokenizer that declares none (luffy's
    byte tokenizer) leaves them null and CTranslate2 refuses the model. The model config has their ids."""
    config = json.loads((ct2_dir / "config.json").read_text())
    vocab = json.loads((ct2_dir / "vocabulary.json").read_text())
    model = json.loads((hf_dir / "config.json").read_text())
    for key in ("bos_token", "eos_token"):
        token_id = model.get(f"{key}_id")
        if config.get(key) is None and isinstance(token_id, int) and 0 <= token_id < len(vocab):
            config[key] = vocab[token_id]
    (ct2_dir / "config.json").write_text(json.dumps(config, indent=2))


class OpenVinoRunner(PythonPeerRunner):
    """OpenVINO GenAI: optimum-cli export openvino on the HF directory, its LLMPipeline on the CPU plugin."""

    name, module = "openvino", "openvino_genai"
    formats = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
    max_batch = 1  # LLMPipeline (continuous batching on CPU) takes one token-id row per request

    def build(self) -> dict:
        out = Path(self.paths["build_dir"])
        shutil.rmtree(out, ignore_errors=True)
        cli = Path(self.python).with_name("optimum-cli")
        start = time.perf_counter()
        _run([str(cli), "export", "openvino", "--model", str(self.paths["hf_dir"]), "--task",
              "text-generation-with-past", "--weight-format", self.formats[artifact_precision(self.paths)], str(out)],
             "optimum-cli export openvino", env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return {"build_s": round(time.perf_counter() - start, 3)}


NATIVE_RUNNERS = (LlamaCppRunner, CTranslate2Runner, OpenVinoRunner)
