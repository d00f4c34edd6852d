"""LuffyConfig: every compile option in one object, shared by the CLI, `luffy.compile` and LuffyOptimizer."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace

from ..errors import UsageError
from ..options import option  # an option is one field: its flag, help and default (luffy/options.py)

OPTIMIZATION_LEVELS = {"none": 0, "conservative": 1, "balanced": 2}
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "int8-dynamic")
WEIGHT_ONLY = ("int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128)
KV_CACHE_DTYPES = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
CALIBRATED_KV = ("int8", "int4")
EXTERNAL_DATA_MODES = ("auto", "always", "never")
HARDWARE_COMPATIBILITY = ("none", "ampere+")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str) -> int:
    """Bytes in ``text``: 6GB, 6G, 512MiB, 1.5T or a plain number of bytes (units are powers of 1024).

    >>> parse_size("6GB", "--max-memory"), parse_size("512m", "--max-memory")
    (6442450944, 536870912)
    """
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"{flag} {text!r}: expected a size like 6GB, 512MB or 1.5T")
    unit = (match.group(2) or "B")[0].upper()
    return int(float(match.group(1)) * 1024 ** "BKMGT".index(unit))


@dataclass(frozen=True)
class LuffyConfig:
    """Compile options.

    ``optimization_level`` is the named form of ``opt_level`` ("none" = 0, "conservative" = 1,
    "balanced" = 2); when given it wins.

    >>> LuffyConfig(optimization_level="conservative").opt_level
    1
    """

    target: str = option("ort", "ort (ONNX Runtime) or trt (TensorRT).")
    precision: str = option(
        "fp32", "fp32 | fp16 | bf16 | int8 | int4 | int8-dynamic. int8/int4: weight-only, blockwise (MatMulNBits), "
        "GPTQ with --calib else round-to-nearest; int8-dynamic: int8 activations too; fp16/bf16: weights and "
        "activations (fp32 kept for norms' reductions, softmax and logits). bf16 is for GPUs; on a CPU luffy checks it "
        "by rounding each op's fp32 result to bf16 (slow, not a serving mode).")
    kv_cache_dtype: str = option(
        "auto", "KV cache precision: auto (the compute's: fp16 with --precision fp16, else fp32) | fp32 | fp16 | int8 | "
        "int4. int8/int4: per-channel scales calibrated on --kv-calib (else --calib) text. ONNX Runtime's CPU "
        "attention has no bf16 cache.")
    kv_calib: str | None = option(None, "int8/int4 KV cache: text (or token ids as .json) its scales are measured on "
                                  "[--calib]; unlike --calib it does not turn weight quantization into GPTQ.",
                                  metavar="FILE")
    # None: decided by the compiling CPU (runtimes/cpu_features.weight_kernels; where MLAS has int8 kernels, 128 for
    # int4 and 32, q8_0's, for int8)
    block_size: int | None = option(None, "int8/int4: weights per scale, 16 | 32 | 64 | 128 (smaller: more accurate, "
                                    "more bytes) [decided by this CPU: with int8 dot products int4 128, int8 32]")
    # None: the weights' bits. The head is a fifth of a 156M model's weights and the one llama.cpp keeps wider
    # (q4_0 writes it as q6_K): int4 at block 32 with an 8-bit head beats q4_0's quality on llama-pydoc, where int4
    # alone does not (docs/precision.md)
    lm_head_bits: int | None = option(None, "int8/int4: bits of the lm_head and of an embedding table tied to it, "
                                      "4 | 8 (int4 weights with 8: less loss, more bytes per token) [the weights' "
                                      "bits]")
    # runtimes/batch_invariance.py: MLAS's fastest int8-product kernels compute a lone row (and a batch's odd last
    # row) differently from the rows of a batch, so a served request can differ from itself alone
    batch_invariant: bool = option(False, "int8/int4: the largest block whose kernels on this CPU compute a row the "
                                   "same in any batch, so a served request's tokens equal its tokens alone (docs/"
                                   "serving.md) [off: the fastest block]")
    calib: str | None = option(None, "int8/int4: text (or token ids as .json) to calibrate on; quantizes by GPTQ instead "
                               "of round-to-nearest.", metavar="FILE")
    eval_file: str | None = option(None, "Text (or .json token ids): perplexity before and after, in the report.",
                                   "--eval", metavar="FILE")
    # --auto: compile every precision this target runs, measure quality on eval_file and speed here, keep the
    # fastest within max_quality_loss (percent); auto_time_budget (seconds) bounds it (luffy/auto.py)
    auto: bool = option(
        False, "Compile every precision ONNX Runtime runs here (fp32; int4 block 128/32 and int8, round-to-nearest "
        "and with --calib GPTQ; int8-dynamic), measure quality on --eval and speed on this machine, and write the "
        "fastest within --max-quality-loss. --precision P: only P's variants.", group="auto")
    max_quality_loss: float | None = option(
        None, "--auto: the largest quality loss allowed, in percent (decoders: perplexity increase on --eval; "
        "encoders: 100 x (1 - embedding cosine)).", metavar="PCT", group="auto")
    auto_time_budget: float | None = option(
        None, "--auto: start no further candidate once this would be exceeded; the report says which were skipped.",
        metavar="SECONDS", group="auto")
    accuracy_level: int | None = option(None, "int8/int4 MatMulNBits: 4 = int8 products (fast on CPU), 0 = fp32 "
                                        "[decided by this CPU: 4 where MLAS has int8 kernels]", min=0, max=4)
    # None: decided by the compiling CPU (x86 CPUs without VNNI need 7-bit weights: their u8s8 kernels saturate)
    reduce_range: bool | None = option(
        None, "int8-dynamic: 7-bit weights, correct on every x86 CPU; --no-reduce-range: 8-bit, only for CPUs with "
        "VNNI [decided by this CPU]", "--reduce-range/--no-reduce-range")
    opt_level: int = option(2, "0 none, 1 cleanup, 2 fusions (default).", "-O", "--opt-level", min=0, max=2)
    optimization_level: str | None = None  # the API's named form of opt_level
    max_seq_len: int | None = option(None, "Longest prompt + generation the artifact serves [the model's position "
                                     "limit].")
    disabled_passes: tuple[str, ...] = option((), "Skip a pass by name (repeatable).", "--disable-pass", metavar="PASS")
    enabled_passes: tuple[str, ...] = option((), "Add a pass from the -O2 list by name, to -O0/-O1 (repeatable).",
                                             "--enable-pass", metavar="PASS")
    check_parity: bool = option(True, "Compare with PyTorch before publishing.", "--check-parity/--no-check-parity")
    # compiler/stream/: Hugging Face safetensors directories are captured from a few layers and stamped across the
    # depth; weights stream from the checkpoint into the artifact one tensor at a time
    stream: bool = option(True, "Hugging Face safetensors directories: export a few decoder layers, stamp them across "
                          "the depth and stream each weight from the checkpoint into the artifact (memory bounded by "
                          "one layer); --no-stream loads the whole model in PyTorch.", "--stream/--no-stream")
    max_memory: str | None = option(None, "Refuse, before any work, a compile estimated to need more memory than this "
                                    "(e.g. 6GB, 512MB) [what the machine has available].", metavar="SIZE")
    external_data: str = option("auto", "Weights in model.onnx.data: auto (when large) | always | never.")
    verify: bool = option(False, "After every pass run the ONNX checker, shape inference and a numeric check on ONNX "
                          "Runtime against the captured graph; fail naming the pass that broke parity.")
    dump_ir: str | None = option(None, "Write the graph after every pass as DIR/NN-<pass>.onnx (00-captured.onnx "
                                 "first; weights in one shared DIR/weights.data).", metavar="DIR")
    trt_version: str | None = option(None, "trt: the TensorRT whose ONNX parser the graph must pass (e.g. 10.16) "
                                     "[installed, else the newest luffy knows].", group="trt")
    defer_build: bool = option(False, "trt: write the legalized ONNX, profiles and a trtexec line (state needs-build) "
                               "without TensorRT; finish with `luffy build DIR` on the GPU machine.", group="trt")
    max_batch: int = option(8, "trt: largest batch in the profiles.", min=1, group="trt")
    opt_batch: int = option(1, "trt: batch the kernels are tuned for.", min=1, group="trt")
    opt_seq_len: int | None = option(None, "trt: prompt length the prefill profile is tuned for [min(128, max)].",
                                     min=1, group="trt")
    timing_cache: str | None = option(None, "trt: persistent timing cache, safe to share between builds "
                                      "[~/.cache/luffy/trt-timing.cache].", metavar="FILE", group="trt")
    hardware_compatibility: str = option("none", "trt: none (this GPU's architecture) | ampere+ (any Ampere or newer).",
                                         group="trt")
    version_compatible: bool = option(False, "trt: an engine newer TensorRT versions and the lean runtime can load.",
                                      group="trt")

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
        if self.max_memory is not None:
            parse_size(self.max_memory, "--max-memory")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise UsageError(f"block_size {self.block_size!r}; choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.batch_invariant and (self.block_size is not None or self.precision not in WEIGHT_ONLY):
            raise UsageError("--batch-invariant chooses the block size of int8/int4 weights: drop --block-size"
                             if self.block_size is not None else
                             f"--batch-invariant applies to int8/int4 weights, not precision {self.precision}")
        if self.lm_head_bits is not None:
            self._check_lm_head_bits()
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
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
        self._check_kv_cache()
        if self.calib is not None and self.precision not in WEIGHT_ONLY and not self.auto \
                and self.kv_cache_dtype not in CALIBRATED_KV:
            raise UsageError(f"--calib calibrates int8/int4 weights or an int8/int4 KV cache; precision "
                             f"{self.precision} with KV cache {self.kv_cache_dtype} takes none")
        for name in ("calib", "eval_file", "kv_calib"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))
        object.__setattr__(self, "enabled_passes", tuple(self.enabled_passes))
        for name in ("dump_ir", "timing_cache"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))  # a Path is welcome; JSON wants str

    def _check_lm_head_bits(self) -> None:
        if self.lm_head_bits not in (4, 8):
            raise UsageError(f"lm_head_bits {self.lm_head_bits!r}; choose 4 or 8")
        if self.auto:
            raise UsageError("--lm-head-bits with --auto: --auto chooses the weights' precision; compile the head's "
                             "bits with --precision int8 or int4")
        if self.precision not in WEIGHT_ONLY:
            raise UsageError(f"--lm-head-bits applies to int8/int4 weights, not precision {self.precision}")

    def _check_kv_cache(self) -> None:
        kv = self.kv_cache_dtype
        if kv not in KV_CACHE_DTYPES:
            raise UsageError(f"kv_cache_dtype {kv!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
        if kv == "int4" and self.target == "trt":
            raise UsageError("--kv-cache-dtype int4 for TensorRT: it has no 4-bit activation type; use int8 or fp16")
        if kv == "bf16" and self.target == "ort":
            raise UsageError("--kv-cache-dtype bf16: ONNX Runtime's CPU GroupQueryAttention has no bf16 cache "
                             "(onnxruntime 1.32); fp16 takes the same bytes with 3 more mantissa bits")
        if kv in CALIBRATED_KV and self.calib is None and self.kv_calib is None:
            raise UsageError(f"--kv-cache-dtype {kv} needs --kv-calib FILE (or --calib): its per-channel scales are "
                             "fixed at compile time, measured on that text")
        if self.kv_calib is not None and kv not in CALIBRATED_KV:
            raise UsageError(f"--kv-calib calibrates an int8/int4 KV cache; --kv-cache-dtype {kv} takes none")
        if kv != "auto" and self.precision in ("fp16", "bf16") and kv in ("fp32", "bf16"):
            raise UsageError(f"--kv-cache-dtype {kv} with --precision {self.precision}: the cache would hold "
                             f"{self.precision} values; choose fp16, int8 or int4")
        if kv != "auto" and self.precision == "bf16":
            raise UsageError("--kv-cache-dtype with --precision bf16: bf16 artifacts are a check path on the CPU")
        if kv != "auto" and self.auto:
            raise UsageError("--kv-cache-dtype with --auto: --auto chooses the weights' precision; compile the KV "
                             "cache's separately")

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
        """The options as the manifest records them: every field with a flag; a group's fields (TensorRT's,
        --auto's) only when that group is on."""
        out = {}
        for f in fields(self):
            group = f.metadata.get("group")
            if "flags" not in f.metadata or (group == "trt" and self.target != "trt") or (group == "auto" and not self.auto):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
