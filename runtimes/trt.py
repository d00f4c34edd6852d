"""The TensorRT engine: compatibility checks before deserializing, execute_async_v3, device KV cache.

An engine is native code for one GPU architecture and one TensorRT version, so `check_engine` compares
the manifest's build record with the installed TensorRT and the GPU before a byte is deserialized (the
engine's sha256 was already checked by `read_manifest`). Device buffers are torch CUDA tensors: the GPU
images luffy deploys to carry torch, and its caching allocator makes the per-step present buffers of the
portable graph's concat-mode cache (present = past + new token) cheap without a framework of luffy's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, UsageError
from .constraint import warn_incomplete
from .engine import STRUCTURED, Engine
from .generation import PositionTracker, generate_loop, left_pad, positions_from_mask

PREFILL, DECODE = 0, 1  # profile indices, in the order compile writes manifest["tensorrt"]["profiles"]


def installed_tensorrt():
    """The importable TensorRT module (full or lean) or None."""
    for name in ("tensorrt", "tensorrt_lean"):
        try:
            return __import__(name)
        except ImportError:
            continue
    return None


def gpu_info() -> dict | None:
    """Name, compute capability and CUDA version of GPU 0, or None when no NVIDIA GPU is visible."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
                "cuda": torch.version.cuda}
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    _, version = cudart.cudaRuntimeGetVersion()
    return {"name": props.name.decode().rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}",
            "cuda": f"{version // 1000}.{version % 1000 // 10}"}


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def check_engine(manifest: dict, path: Path, trt_version: str | None, gpu: dict | None) -> None:
    """Refuse an engine this machine cannot run, naming what it was built for and what is here.

    >>> check_engine(manifest, path, "10.16.1.11", {"compute_capability": "9.0"})   # doctest: +SKIP
    """
    section = manifest.get("tensorrt") or {}
    build = section.get("build")
    if manifest.get("state") != "ready" or not build:
        raise ArtifactError(f"{path}: TensorRT engine not built yet (state {manifest.get('state')!r}); run "
                            f"`luffy build {path}` on the GPU machine, or load(..., runtime='ort') to run its ONNX graph")
    if trt_version is None:
        raise BackendUnavailableError(f"{path}: engine built with TensorRT {build['tensorrt']}; TensorRT is not "
                                      "installed here (pip install tensorrt, on a machine with an NVIDIA GPU)")
    built, here = _release(build["tensorrt"]), _release(trt_version)
    if build.get("version_compatible"):
        if here[0] != built[0] or here < built:
            raise ArtifactError(f"{path}: version-compatible engine built with TensorRT {build['tensorrt']} needs "
                                f"TensorRT {built[0]}.x at or above it; installed is {trt_version}")
    elif here != built:
        raise ArtifactError(f"{path}: engine built with TensorRT {build['tensorrt']}, installed is {trt_version}; "
                            "rebuild it (`luffy build`) or compile with --version-compatible")
    if gpu is None:
        raise BackendUnavailableError(f"{path}: engine built for {build['gpu']} (compute capability "
                                      f"{build['compute_capability']}); no NVIDIA GPU is visible here")
    built_cc, here_cc = _release(build["compute_capability"]), _release(gpu["compute_capability"])
    if build.get("hardware_compatibility") == "ampere+":
        if here_cc < (8, 0):
            raise ArtifactError(f"{path}: Ampere+ engine needs compute capability >= 8.0; "
                                f"this GPU ({gpu.get('name')}) is {gpu['compute_capability']}")
    elif here_cc != built_cc:
        raise ArtifactError(f"{path}: engine built for compute capability {build['compute_capability']} "
                            f"({build['gpu']}); this GPU ({gpu.get('name')}) is {gpu['compute_capability']}; "
                            "rebuild it here or compile with --hardware-compatibility ampere+")


class TrtEngine(Engine):
    """Runs an artifact's model.engine with TensorRT; the same interface as the ORT engine."""

    def __init__(self, path: Path, manifest: dict, trt, gpu: dict):
        super().__init__(path, manifest)
        import torch

        check_engine(manifest, self.path, trt.__version__, gpu)
        self._torch, self._trt = torch, trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if manifest["tensorrt"]["build"].get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # a version-compatible engine carries its lean runtime
        plugin_ids = list(manifest["tensorrt"]["operator_check"].get("plugins", {}))
        if plugin_ids:
            from ..plugins import register_tensorrt

            register_tensorrt(plugin_ids)  # the engine names its plugins; their creators must exist first
        engine_path = self.path / manifest["tensorrt"]["engine_file"]
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"{engine_path}: TensorRT {trt.__version__} could not deserialize it (see its log)")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._inputs = [n for n in self._tensor_names() if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in self._tensor_names() if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._profile = None

    def _tensor_names(self) -> list[str]:
        return [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]

    def _dtype(self, name: str):
        trt, torch = self._trt, self._torch
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                  trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool,
                  trt.int8: torch.int8}  # an int8 KV cache (--kv-cache-dtype int8)
        return dtypes[self._engine.get_tensor_dtype(name)]

    def _execute(self, feeds: dict, profile: int) -> dict:
        """Bind ``feeds`` (torch tensors on the GPU) under ``profile``, run, return the outputs (on the GPU)."""
        torch = self._torch
        if self._profile != profile:
            self._context.set_optimization_profile_async(profile, self._stream.cuda_stream)
            self._profile = profile
        for name in self._inputs:
            tensor = feeds[name].to(dtype=self._dtype(name)).contiguous()
            feeds[name] = tensor
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise ArtifactError(f"{self.path}: TensorRT execute_async_v3 failed (see its log)")
        self._stream.synchronize()
        return outputs

    def _empty_cache(self, batch: int) -> dict:
        """[batch, kv_heads, 0, head_dim] per past input, in the graph's own dtype: a prompt's first step."""
        kv, cache = self.manifest["kv_cache"], {}
        for i in range(kv["num_layers"]):
            for kind in ("key", "value"):
                past = kv["past_input"].format(layer=i, kind=kind)
                shape = self.manifest["tensorrt"]["profiles"][PREFILL]["shapes"][past]["min"]
                cache[past] = self._torch.empty((batch, shape[1], 0, shape[3]), dtype=self._dtype(past), device="cuda")
        return cache

    def score(self, input_ids, attention_mask=None) -> np.ndarray:
        """As OrtEngine.score: float32 logits [batch, seq, vocab] for every position, one prefill call."""
        torch = self._torch
        ids, mask = self._score_inputs(input_ids, attention_mask)
        feeds = {"input_ids": torch.from_numpy(ids).cuda(), "attention_mask": torch.from_numpy(mask).cuda(),
                 "position_ids": torch.from_numpy(positions_from_mask(mask)).cuda(), **self._empty_cache(ids.shape[0])}
        return self._execute(feeds, PREFILL)["logits"].float().cpu().numpy()

    def run(self, feeds: dict) -> dict:
        """One call of the engine on numpy ``feeds``; numpy outputs."""
        torch = self._torch
        gpu_feeds = {name: torch.from_numpy(np.ascontiguousarray(value)).cuda() for name, value in feeds.items()}
        return {k: v.cpu().numpy() for k, v in self._execute(gpu_feeds, PREFILL).items()}

    def generate(self, input_ids, max_new_tokens: int = 32, eos_token_id="model", pad_token_id=None,
                 seed: int | None = None, output_logits: bool = False, streamer=None, constraint=None, **choosing):
        """As OrtEngine.generate: left-padded prompts, greedy unless ``do_sample``, the same logits chain
        (``choosing``: do_sample, temperature, top_k, top_p, min_p, the penalties, logit_bias, min_new_tokens;
        json_schema, regex, grammar or choice);
        int64 [batch, prompt + new]. Speculative decoding (``assistant_model``, ``prompt_lookup_num_tokens``)
        runs on the ORT engine only."""
        speculative = [k for k in ("assistant_model", "prompt_lookup_num_tokens") if choosing.pop(k, None) is not None]
        if speculative:
            raise UsageError(f"{self.path}: {speculative[0]} needs the ONNX Runtime engine (load(..., runtime='ort'))")
        torch, kv = self._torch, self.manifest["kv_cache"]
        rows, eos_token_id, pad = self._generate_inputs(input_ids, max_new_tokens, eos_token_id, pad_token_id)
        structured = {k: choosing.pop(k, None) for k in STRUCTURED}
        sampling = self._sampling(eos_token_id, **choosing)
        constraints = self._row_constraints(constraint, len(rows), max_new_tokens, structured)
        ids, mask = left_pad(rows, pad)
        names = [(kv["past_input"].format(layer=i, kind=k), kv["present_output"].format(layer=i, kind=k))
                 for i in range(kv["num_layers"]) for k in ("key", "value")]
        cache = self._empty_cache(len(rows))

        def step(step_ids, step_mask, positions, past_len):
            feeds = {"input_ids": torch.from_numpy(step_ids).cuda(), "attention_mask": torch.from_numpy(step_mask).cuda(),
                     "position_ids": torch.from_numpy(np.ascontiguousarray(positions)).cuda(), **cache}
            out = self._execute(feeds, PREFILL if past_len == 0 else DECODE)
            for past, present in names:
                cache[past] = out[present]  # the next step's past: no copy, the allocator recycles the old one
            return out["logits"][:, -1, :].float().cpu().numpy()

        out = generate_loop(PositionTracker(step), ids, mask, max_new_tokens, sampling, pad_token_id=pad, seed=seed,
                            output_logits=output_logits, streamer=streamer, constraints=constraints)
        warn_incomplete(constraints, max_new_tokens)
        return out
