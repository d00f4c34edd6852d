"""Building a TensorRT engine from a legalized artifact: strongly typed network, profiles, timing cache.

Runs only where TensorRT's full Python package (the builder, not the lean runtime) and an NVIDIA GPU are
present; everything before it (legalize, op check, profiles, the needs-build artifact) runs anywhere. An
engine is tied to the GPU and TensorRT it was built with, so the build record names both.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

import onnx_ir as ir

from ...errors import ArtifactError, BackendUnavailableError, UnsupportedModelError
from ...runtimes.manifest import STATE_NEEDS_BUILD, read_manifest
from ...runtimes.trt import gpu_info, installed_tensorrt
from ..emit.artifact import staged_directory, write_manifest

HOW_TO_PROCEED = ("compile with --defer-build here (writes the portable ONNX, profiles and a trtexec line), then "
                  "run `luffy build ARTIFACT` on the GPU machine")


def default_timing_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "luffy" / "trt-timing.cache"


def require_builder(hint: str = HOW_TO_PROCEED):
    """(tensorrt module, gpu info), or BackendUnavailableError saying what is missing and how to proceed."""
    trt = installed_tensorrt()
    if trt is None:
        missing = "the tensorrt Python package is not installed"
    elif not hasattr(trt, "Builder"):
        missing = f"{trt.__name__} {trt.__version__} is TensorRT's runtime-only (lean) package, which has no builder"
    else:
        gpu = gpu_info()
        if gpu is not None:
            return trt, gpu
        missing = f"TensorRT {trt.__version__} is installed but no NVIDIA GPU is visible"
    raise BackendUnavailableError(f"building a TensorRT engine needs TensorRT's builder and an NVIDIA GPU: {missing}; "
                                  f"{hint}")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_engine(trt, onnx_path: Path, profiles: list[dict], engine_path: Path, *, timing_cache: Path,
                 hardware_compatibility: str = "none", version_compatible: bool = False, plugin_ids=(),
                 say=lambda m: None) -> dict:
    """Parse ``onnx_path`` as a strongly typed network, add ``profiles``, build and write ``engine_path``.

    The timing cache is read before the build and merged back after it under a file lock, so two builds
    sharing one cache both keep their timings. Returns the build record for the manifest.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) == 10:  # 11 is strongly typed only; the flag is deprecated there
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    if plugin_ids:
        from ...plugins import register_tensorrt

        say(f"registering luffy plugins {', '.join(plugin_ids)}")
        register_tensorrt(plugin_ids)  # before parsing: the parser looks creators up by name
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f"node {first.node_name()} ({first.node_operator()})" if first else "the graph"
        raise UnsupportedModelError(f"{onnx_path}: TensorRT {trt.__version__}'s ONNX parser rejects {where}: "
                                    f"{first.desc() if first else 'no error recorded'}")
    config = builder.create_builder_config()
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, shape in spec["shapes"].items():
            profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(profile)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatibility == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)
    say(f"building the TensorRT {trt.__version__} engine ({len(profiles)} profiles)")
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"{onnx_path}: TensorRT {trt.__version__} could not build an engine (see its log above)")
    seconds = time.perf_counter() - started
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    with _locked(timing_cache):
        # another build may have written the cache meanwhile: merge with what is there now, then replace
        if timing_cache.is_file():
            cache.combine(config.create_timing_cache(timing_cache.read_bytes()), True)
        tmp = timing_cache.with_name(f"{timing_cache.name}.{os.getpid()}.tmp")
        tmp.write_bytes(bytes(cache.serialize()))
        os.replace(tmp, timing_cache)
    return {"seconds": round(seconds, 3), "timing_cache": str(timing_cache), "cache_entries_reused": bool(cache_bytes)}


ENGINE_FILE = "model.engine"


def build_in_directory(directory: Path, manifest: dict, trt, gpu: dict, timing_cache: Path | None = None,
                       say=lambda m: None) -> dict:
    """Build ``directory``'s needs-build artifact in place; the manifest returned is ready (not yet written)."""
    section = manifest["tensorrt"]
    options = section["options"]
    timing_cache = Path(timing_cache or options.get("timing_cache") or default_timing_cache())
    record = build_engine(trt, directory / manifest["model_file"], section["profiles"], directory / ENGINE_FILE,
                          timing_cache=timing_cache, hardware_compatibility=options["hardware_compatibility"],
                          version_compatible=options["version_compatible"],
                          plugin_ids=list(section["operator_check"].get("plugins", {})), say=say)
    built = dict(manifest, state="ready")
    built["tensorrt"] = {**section, "engine_file": ENGINE_FILE, "build": {
        **record, "tensorrt": trt.__version__, "cuda": gpu["cuda"], "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "hardware_compatibility": options["hardware_compatibility"], "version_compatible": options["version_compatible"],
    }}
    return built


def build_artifact(path: str | os.PathLike, timing_cache: str | os.PathLike | None = None, say=lambda m: None) -> dict:
    """`luffy build ARTIFACT`: finish a needs-build TensorRT artifact on this GPU machine.

    Checks the graph against the installed TensorRT's parser first, builds in a staged copy and replaces
    the artifact only when the engine and the new manifest are written.

    >>> build_artifact("build/llama-trt")["state"]        # doctest: +SKIP
    'ready'
    """
    from .trt_support import check_graph, require_supported

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("target") != "trt" or "tensorrt" not in manifest:
        raise ArtifactError(f"{path}: a --target {manifest.get('target')} artifact; `luffy build` builds TensorRT ones")
    if manifest.get("state") != STATE_NEEDS_BUILD:
        raise ArtifactError(f"{path}: state is {manifest.get('state')!r}, not {STATE_NEEDS_BUILD!r}; nothing to build")
    trt, gpu = require_builder(hint="run `luffy build` where TensorRT's full package (with libnvinfer's builder) "
                                    "and the target NVIDIA GPU are present")
    report = check_graph(ir.load(path / manifest["model_file"]), trt.__version__)
    require_supported(report, str(path / manifest["model_file"]))
    manifest = dict(manifest, tensorrt={**manifest["tensorrt"], "operator_check": operator_check_summary(report)})
    with staged_directory(path) as stage:
        for rel in manifest["files"]:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path / rel, stage / rel)
        built = build_in_directory(stage, manifest, trt, gpu, Path(timing_cache) if timing_cache else None, say)
        manifest = write_manifest(stage, built)
    return manifest


def operator_check_summary(report: dict) -> dict:
    """The operator check as the manifest keeps it (the per-node list only matters when it fails)."""
    summary = {k: report[k] for k in ("trt_version", "operator_list", "source", "nodes_checked", "supported")}
    plugins: dict[str, int] = {}
    for entry in report["via_plugin"]:
        plugins[entry["plugin"]] = plugins.get(entry["plugin"], 0) + 1
    summary["plugins"] = plugins  # plugin id -> nodes; luffy build and the runtime register these
    return summary
