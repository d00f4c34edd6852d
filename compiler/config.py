"""LuffyConfig: every compile option in one object, shared by the CLI, `luffy.compile` and LuffyOptimizer."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from ..errors import UsageError

OPTIMIZATION_LEVELS = {"none": 0, "conservative": 1, "balanced": 2}
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "int8-dynamic")
WEIGHT_ONLY = ("int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128)
EXTERNAL_DATA_MODES = ("auto", "always", "never")
HARDWARE_COMPATIBILITY = ("none", "ampere+")


@dataclass(frozen=True)
class LuffyConfig:
    """Compile options.

    ``optimization_level`` is the named form of ``opt_level`` ("none" = 0, "conservative" = 1,
    "balanced" = 2); when given it wins.

    >>> LuffyConfig(optimization_level="conservative").opt_level
    1
    """

    target: str = "ort"
    precision: str = "fp32"
    opt_level: int = 2
    optimization_level: str | None = None
    max_seq_len: int | None = None  # default: the model's own position limit
    disabled_passes: tuple[str, ...] = ()
    enabled_passes: tuple[str, ...] = ()
    check_parity: bool = True  # compare the emitted graph with PyTorch before the artifact is published
    external_data: str = "auto"  # weights in model.onnx.data: auto (when large), always, never
    verify: bool = False  # check + shape-infer + run the graph after every pass; name the pass that breaks it
    dump_ir: str | None = None  # directory for the graph after every pass (NN-<pass>.onnx)
    block_size: int = 32  # weight-only int8/int4: weights per scale (smaller = more accurate, more bytes)
    calib: str | None = None  # text or token ids (.json) for calibrated quantization (GPTQ); none = RTN
    eval_file: str | None = None  # text or token ids: perplexity before and after, into the report
    # --auto: compile every precision this target runs, measure quality on eval_file and speed here, keep the
    # fastest within max_quality_loss (percent); auto_time_budget (seconds) bounds it (compiler/auto.py)
    auto: bool = False
    max_quality_loss: float | None = None
    auto_time_budget: float | None = None
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 products on the CPU (fast); 0 = fp32 products
    # int8-dynamic: 7-bit weights, which x86 CPUs without VNNI need (their u8s8 kernels saturate). None: decided
    # by the compiling CPU; True gives an artifact correct on every CPU.
    reduce_range: bool | None = None
    # --target trt
    trt_version: str | None = None  # the TensorRT the graph must parse on; default: installed, else newest known
    defer_build: bool = False  # write the portable ONNX + profiles (state needs-build); `luffy build` finishes it
    max_batch: int = 8  # optimization profiles: the largest batch the engine serves
    opt_batch: int = 1  # ...and the batch TensorRT tunes its kernels for
    opt_seq_len: int | None = None  # prefill profile's tuned prompt length (default min(128, max_seq_len))
    timing_cache: str | None = None  # persistent TensorRT timing cache (default ~/.cache/luffy/trt-timing.cache)
    hardware_compatibility: str = "none"  # none | ampere+: an engine for any Ampere-or-newer GPU
    version_compatible: bool = False  # an engine later TensorRT versions (and the lean runtime) can load

    def __post_init__(self):
        if self.optimization_level is not None:
            if self.optimization_level not in OPTIMIZATION_LEVELS:
                raise UsageError(
                    f"optimization_level {self.optimization_level!r}; choose one of {', '.join(OPTIMIZATION_LEVELS)}"
                )
            object.__setattr__(self, "opt_level", OPTIMIZATION_LEVELS[self.optimization_level])
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.external_data not in EXTERNAL_DATA_MODES:
            raise UsageError(f"external_data {self.external_data!r}; choose one of {', '.join(EXTERNAL_DATA_MODES)}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise UsageError(f"max_seq_len {self.max_seq_len!r} must be an integer >= 2")
        if self.block_size not in BLOCK_SIZES:
            raise UsageError(f"block_size {self.block_size!r}; choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"accuracy_level {self.accuracy_level!r}; choose 0 (fp32 products) to 4 (int8 products)")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise UsageError(f"hardware_compatibility {self.hardware_compatibility!r}; choose one of "
                             f"{', '.join(HARDWARE_COMPATIBILITY)}")
        for name in ("max_batch", "opt_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"{name} {getattr(self, name)!r} must be an integer >= 1")
        if self.opt_batch > self.max_batch:
            raise UsageError(f"opt_batch {self.opt_batch} exceeds max_batch {self.max_batch}")
        trt_only = [flag for flag, on in (("--defer-build", self.defer_build), ("--trt-version", self.trt_version),
                                          ("--version-compatible", self.version_compatible),
                                          ("--hardware-compatibility", self.hardware_compatibility != "none")) if on]
        if trt_only and self.target != "trt":
            raise UsageError(f"{trt_only[0]} is a TensorRT option; add --target trt")
        self._check_auto()
        if self.calib is not None and self.precision not in WEIGHT_ONLY and not self.auto:
            raise UsageError(f"--calib calibrates int8/int4 weight-only quantization; precision {self.precision} takes none")
        for name in ("calib", "eval_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))
        object.__setattr__(self, "enabled_passes", tuple(self.enabled_passes))
        for name in ("dump_ir", "timing_cache"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))  # a Path is welcome; JSON wants str  # a Path is welcome; JSON wants str

    def _check_auto(self) -> None:
        if not self.auto:
            if self.max_quality_loss is not None or self.auto_time_budget is not None:
                raise UsageError("--max-quality-loss and --auto-time-budget take effect with --auto; add --auto")
            return
        if self.max_quality_loss is None or self.eval_file is None:
            raise UsageError("--auto needs --max-quality-loss PCT and --eval FILE (the budget and what it is measured on)")
        if not isinstance(self.max_quality_loss, (int, float)) or not 0 <= self.max_quality_loss < 100:
            raise UsageError(f"--max-quality-loss {self.max_quality_loss!r} must be a percentage >= 0 and < 100")
        if self.auto_time_budget is not None and not (isinstance(self.auto_time_budget, (int, float))
                                                      and self.auto_time_budget > 0):
            raise UsageError(f"--auto-time-budget {self.auto_time_budget!r} must be a number of seconds > 0")
        if self.dump_ir is not None:
            raise UsageError("--dump-ir with --auto: every candidate would overwrite the dump; dump one --precision")
        if self.target != "ort":
            raise UsageError(f"--auto measures candidates on ONNX Runtime on this machine; --target {self.target} "
                             f"is not supported (compile with an explicit --precision)")

    def with_overrides(self, **overrides) -> "LuffyConfig":
        """A copy with every non-None override applied (how `compile`'s keywords beat ``config``)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise UsageError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "opt_level" in given:
            given["optimization_level"] = None
        return replace(self, **given)

    def to_json(self) -> dict:
        return {
            "target": self.target, "precision": self.precision, "opt_level": self.opt_level,
            "max_seq_len": self.max_seq_len, "disabled_passes": list(self.disabled_passes),
            "enabled_passes": list(self.enabled_passes), "check_parity": self.check_parity,
            "external_data": self.external_data, "verify": self.verify, "dump_ir": self.dump_ir,
            "block_size": self.block_size, "calib": self.calib, "eval_file": self.eval_file,
            "accuracy_level": self.accuracy_level, "reduce_range": self.reduce_range,
            **({"auto": True, "max_quality_loss": self.max_quality_loss, "auto_time_budget": self.auto_time_budget}
               if self.auto else {}),
            **({"trt_version": self.trt_version, "defer_build": self.defer_build, "max_batch": self.max_batch,
                "opt_batch": self.opt_batch, "opt_seq_len": self.opt_seq_len, "timing_cache": self.timing_cache,
                "hardware_compatibility": self.hardware_compatibility, "version_compatible": self.version_compatible}
               if self.target == "trt" else {}),
        }
