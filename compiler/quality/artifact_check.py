"""`luffy verify ARTIFACT`: is this artifact intact and usable here? What a CI step or a deploy runs.

Checks, in order, each a line of the result: the manifest and every file's sha256 (read_manifest); that the
installed runtime can run it (onnxruntime's own probe of the opsets and IR version; for a built TensorRT
engine, TensorRT's version and the GPU); that it loads; a smoke run (a few greedy tokens for a decoder,
one inference on example inputs otherwise, outputs finite); and with ``parity_source`` the compile's parity
check against that source again. The first failure raises one line with the artifact's exit code.
"""

from __future__ import annotations

import importlib.metadata as md
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import ArtifactError, LuffyError, first_line
from ...runtimes import open_engine
from ...runtimes.manifest import read_manifest
from ...runtimes.ort import _NUMPY_DTYPES
from ...runtimes.ort_compat import check_onnxruntime
from ...runtimes.trt import check_engine, gpu_info, installed_tensorrt
from ..capture.torch_export import reference_only
from ..sources.resolve import resolve_source
from ..sources.torch_model import load_torch_model
from .parity import check_parity


def verify_artifact(path: str | Path, parity_source=None, say: Callable[[str], None] | None = None) -> dict:
    """Run every check; returns {"artifact", "checks": [{"check", "ok", "detail", "seconds"}], "ok": True}.

    >>> verify_artifact("build/pydoc", parity_source="llama-pydoc")["ok"]   # doctest: +SKIP
    True
    """
    path = Path(path)
    say = say or (lambda message: None)
    checks: list[dict] = []

    def check(name: str, run: Callable[[], str]):
        say(name)
        start = time.perf_counter()
        try:
            detail = run()
        except LuffyError as exc:
            raise ArtifactError(f"{path}: {name} failed: {exc}") from None
        checks.append({"check": name, "ok": True, "detail": detail, "seconds": round(time.perf_counter() - start, 3)})

    state = {}
    check("files", lambda: _files(path, read_manifest(path), state))
    check("runtime", lambda: _runtime(path, state))
    check("load", lambda: _load(path, state))
    check("smoke run", lambda: _smoke(state["engine"]))
    if parity_source is not None:
        check("parity", lambda: _parity(path, state, parity_source))
    return {"artifact": str(path), "checks": checks, "ok": True}


def _files(path: Path, manifest: dict, state: dict) -> str:
    state["manifest"] = manifest
    files = manifest["files"]
    return (f"format {manifest['format_version']}, {len(files)} files, "
            f"{sum(f['size'] for f in files.values()) / 2**20:.1f} MiB, sha256 verified")


def _runtime(path: Path, state: dict) -> str:
    manifest = state["manifest"]
    state["runtime"] = "ort"
    if manifest["target"] == "trt" and manifest["state"] == "ready":
        trt = installed_tensorrt()
        check_engine(manifest, path, trt.__version__ if trt is not None else None, gpu_info())
        state["runtime"] = "trt"
        return f"TensorRT {trt.__version__} runs the engine built with {manifest['tensorrt']['build']['tensorrt']}"
    check_onnxruntime(manifest, path)
    built = (manifest.get("versions") or {}).get("onnxruntime")
    here = md.version("onnxruntime")
    note = "" if built in (None, here) else f" (compiled against {built})"
    return f"onnxruntime {here} runs opsets {manifest.get('opset_imports')}{note}"


def _load(path: Path, state: dict) -> str:
    state["engine"] = open_engine(path, state["manifest"], state["runtime"])  # the files check hashed them
    return f"{type(state['engine']).__name__}, {state['manifest']['kind']}"


def _smoke(engine) -> str:
    if engine.kind == "causal-lm":
        bos = (engine.manifest.get("generation") or {}).get("bos_token_id")
        prompt = [bos if isinstance(bos, int) else 1, 2, 3]
        out = engine.generate([prompt], max_new_tokens=4, eos_token_id=None)
        logits = engine.score([prompt])
        if not np.isfinite(logits).all():
            raise ArtifactError("the decoder's logits hold NaN or Inf")
        return f"generated {out.shape[1] - len(prompt)} tokens, logits finite"
    outputs = engine.run(_example_feeds(engine))
    bad = [name for name, value in outputs.items() if np.asarray(value).dtype.kind == "f"
           and not np.isfinite(value).all()]
    if bad:
        raise ArtifactError(f"outputs {', '.join(bad)} hold NaN or Inf")
    return f"one inference, {len(outputs)} outputs finite"


def _example_feeds(engine) -> dict:
    """Small inputs of the declared types: symbolic dims 2, token-id-like integer inputs 1."""
    feeds = {}
    for value in engine.session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in value.shape]
        dtype = _NUMPY_DTYPES.get(value.type, np.float32)
        feeds[value.name] = np.ones(shape, dtype=dtype)
    return feeds


def _parity(path: Path, state: dict, source) -> str:
    manifest = state["manifest"]
    src = resolve_source(source)
    if src.kind == "onnx":
        raise ArtifactError(f"--parity {source}: an .onnx file has no PyTorch reference to compare with")
    tm = load_torch_model(src)
    vocab = tm.vocab_size
    reference = reference_only(tm)
    if reference.kind != manifest["kind"]:
        raise ArtifactError(f"against {source}: the source is a {reference.kind}, the artifact a {manifest['kind']}")
    if reference.kv is not None:
        theirs, mine = reference.kv.to_json(), manifest["kv_cache"]
        fields = ("num_layers", "num_kv_heads", "head_dim")
        if any(theirs.get(f) != mine.get(f) for f in fields):
            raise ArtifactError(f"against {source}: its KV cache ({', '.join(f'{f} {theirs.get(f)}' for f in fields)}) "
                                f"is not the artifact's ({', '.join(f'{f} {mine.get(f)}' for f in fields)})")
    try:
        report = check_parity(reference, path / manifest["model_file"], vocab, manifest.get("precision", "fp32"))
    except LuffyError as exc:
        raise ArtifactError(f"against {source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - ORT refusing the source's inputs: not the same model
        raise ArtifactError(f"against {source}: the artifact does not take the source's inputs "
                            f"({first_line(exc, 200)})") from None
    tolerance = f" <= {report['tolerance']}" if report["tolerance"] else f" ({manifest.get('precision')})"
    return f"max |diff| {report['max_abs_diff']:.2e}{tolerance} against {source}"
