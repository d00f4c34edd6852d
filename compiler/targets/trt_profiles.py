"""TensorRT optimization profiles from the manifest's dynamic dims, and the equivalent trtexec command.

A decoder gets two profiles: prefill (a whole prompt, empty cache) and decode (one token, a growing
cache). TensorRT tunes kernels per profile at its `opt` shape, so one profile stretched over both would be
tuned for neither; the runtime selects the profile by step.
"""

from __future__ import annotations

import shlex

from ...errors import UsageError

DEFAULT_OPT_PROMPT = 128


def optimization_profiles(manifest: dict, max_batch: int = 8, opt_batch: int = 1, opt_seq_len: int | None = None) -> list[dict]:
    """min/opt/max shapes of every graph input, per profile, from ``manifest["io"]`` and ``["dims"]``.

    >>> [p["name"] for p in optimization_profiles(manifest)]         # doctest: +SKIP
    ['prefill', 'decode']
    """
    max_len = manifest.get("max_seq_len")
    if not max_len:
        raise UsageError("TensorRT profiles need a sequence limit; compile with --max-seq-len N")
    opt_seq = opt_seq_len if opt_seq_len is not None else min(DEFAULT_OPT_PROMPT, max_len)
    if opt_seq < 1 or opt_seq > max_len:
        raise UsageError(f"--opt-seq-len {opt_seq_len} is outside 1..{max_len} (--max-seq-len)")
    batch = (1, opt_batch, max_batch)
    if manifest["kind"] == "causal-lm":
        opt_past = max_len // 2
        plans = {
            "prefill": {"batch": batch, "seq": (1, opt_seq, max_len), "past": (0, 0, 0), "total": (1, opt_seq, max_len)},
            "decode": {"batch": batch, "seq": (1, 1, 1), "past": (1, opt_past, max_len - 1),
                       "total": (2, opt_past + 1, max_len)},
        }
    else:
        plans = {"all": {"batch": batch, "seq": (1, opt_seq, max_len)}}
    return [{"name": name, "shapes": _shapes(manifest["io"]["inputs"], dims)} for name, dims in plans.items()]


def _shapes(inputs: list[dict], dims: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, list[int]]]:
    shapes = {}
    for value in inputs:
        per_point = {"min": [], "opt": [], "max": []}
        for dim in value["shape"] or []:
            if isinstance(dim, int):
                for point in per_point.values():
                    point.append(dim)
                continue
            if dim not in dims:
                raise UsageError(f"input {value['name']}: dynamic dim {dim!r} has no TensorRT profile range; "
                                 f"luffy knows {', '.join(sorted(dims))}")
            for point, size in zip(per_point.values(), dims[dim]):
                point.append(size)
        shapes[value["name"]] = per_point
    return shapes


def trtexec_command(profiles: list[dict], onnx_file: str = "model.onnx", engine_file: str = "model.engine",
                    timing_cache: str = "timing.cache", strongly_typed: bool = True,
                    hardware_compatibility: str = "none", version_compatible: bool = False) -> str:
    """The trtexec line that builds the same engine as `luffy build` (for teams whose GPU jobs run trtexec).

    ``strongly_typed``: TensorRT 10 needs --stronglyTyped for the graph's own precision to rule; in 11 it is
    the only mode and the flag a no-op.
    """
    args = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}", f"--timingCacheFile={timing_cache}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    if hardware_compatibility == "ampere+":
        args.append("--hardwareCompatibilityLevel=ampere+")
    if version_compatible:
        args.append("--versionCompatible")
    for index, profile in enumerate(profiles):
        if len(profiles) > 1:
            args.append(f"--profile={index}")
        for point in ("min", "opt", "max"):
            spec = ",".join(f"{name}:{'x'.join(map(str, s[point]))}" for name, s in profile["shapes"].items())
            args.append(f"--{point}Shapes={spec}")
    return shlex.join(args)
