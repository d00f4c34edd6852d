"""The pipelines: one explicit ordered list per target and opt level, readable top to bottom.

    -O0  nothing: the captured graph as exported
    -O1  cleanup: folding, dead code, duplicate weights
    -O2  -O1 + fusions (the default)

There is no -O3: it was the -O2 list under another name, and a level that does nothing more is a promise
the compiler does not keep. A level joins when it has passes of its own, measured. `stages` lists what one
compile runs, in order: the opt-level pipeline, the target's extra passes, the precision passes. Each entry
says why it sits where it does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx_ir as ir
from onnx_ir.passes import common

from ..errors import UsageError
from ..plugins import plugins_for_tensorrt
from .collapse_reshapes import collapse_reshapes
from .convert_bf16 import convert_bf16
from .convert_fp16 import convert_fp16
from .dedupe_initializers import dedupe_initializers
from .fold_constants import fold_constants
from .driver import PassStep
from .eliminate_identity import EliminateIdentity
from .fuse_attention import fuse_mha, fuse_sdpa, lower_sdpa
from .fuse_gelu import fuse_gelu
from .fuse_gqa import fuse_gqa
from .fuse_moe import fuse_moe
from .fuse_onnx23 import fuse_onnx23
from .fuse_rms_norm import fuse_rms_norm
from .fuse_rotary import fuse_rotary
from .fuse_skip_norm import fuse_skip_norm
from .keep_last_logits import keep_last_logits
from .kv_cache_dtype import kv_cache_dtype
from .kv_cache_io import kv_cache_io
from .pack_gate_up import pack_gate_up
from .pack_qkv import pack_qkv
from .quantize_dynamic_int8 import quantize_dynamic_int8
from .quantize_moe import quantize_moe
from .quantize_weights import WeightQuantization, quantize_weights
from .rotary_bsd import rotary_bsd
from .simplify_no_ops import simplify_no_ops
from .use_plugins import use_plugins

TARGETS = ("ort", "trt")
OPT_LEVELS = (0, 1, 2)


CLEANUP = [
    # Functions first, so every later pass sees plain nodes.
    PassStep("inline", common.InlinePass, "later passes match plain nodes, not function calls"),
    PassStep("fold-constants", fold_constants, "turns shape arithmetic on static dims into constants"),
    PassStep("eliminate-identity", EliminateIdentity, "Identity nodes hide patterns from fusions"),
    # After folding, so constants like the rotary attention_scaling are visible as literal 1.0.
    PassStep("simplify-no-ops", simplify_no_ops, "x*1, x+0, no-op casts/expands split patterns apart"),
    # Tied weights (embedding / lm_head) and repeated constants are stored once; before CSE, so nodes that
    # read two copies of one weight become identical and CSE merges them.
    # luffy's own: onnx_ir's keys a dict on every weight's bytes (the model twice in memory; a streamed weight read)
    PassStep("dedupe-initializers", dedupe_initializers, "identical weights stored once"),
    PassStep("cse", common.CommonSubexpressionEliminationPass, "merges repeated shape/mask computations"),
    # Dead-code removal after everything that can orphan nodes.
    PassStep("remove-unused", common.RemoveUnusedNodesPass, "drops nodes and initializers nothing reads"),
    PassStep("remove-unused-opsets", common.RemoveUnusedOpsetsPass, "keeps the opset imports honest"),
    PassStep("topological-sort", common.TopologicalSortPass, "a canonical node order for stable artifacts"),
]

ORT_FUSIONS = [
    # Elementwise patterns first: they are small and self-contained, and the bigger patterns below are
    # written against their fused forms (skip-norm expects a fused norm; attention expects fused rotary).
    PassStep("fuse-gelu", fuse_gelu, "5-9 elementwise nodes per GELU become one"),
    PassStep("fuse-rms-norm", fuse_rms_norm, "6-8 nodes per RMSNorm become SimplifiedLayerNormalization"),
    PassStep("fuse-skip-norm", fuse_skip_norm, "residual add + norm in one pass over activations"),
    # Self-contained like the norms: the expert block (router softmax to the weighted sum) shares no node with
    # the norm and attention fusions around it.
    PassStep("fuse-moe", fuse_moe, "top-k routing + per-token expert weight gathers -> MoE runs only chosen experts"),
    PassStep("fuse-rotary", fuse_rotary, "rotate-half per q and k and per-step trigonometry become RotaryEmbedding"),
    # Rotary fusion leaves identical cos/sin lookups per layer; merging them lets attention see one.
    PassStep("cse-after-rotary", common.CommonSubexpressionEliminationPass, "one cos/sin lookup for all layers"),
    PassStep("fuse-sdpa", fuse_sdpa, "Softmax(QK^T*s + mask)V recognised as one attention node"),
    # Decoder step graphs: attention + KV concat + repeat-KV become GroupQueryAttention writing in place
    # into a shared cache buffer. Before fuse-mha, which would otherwise take the same attention nodes.
    PassStep("fuse-gqa", fuse_gqa, "in-place KV cache (no per-step concat copy), unrepeated KV heads"),
    PassStep("fuse-mha", fuse_mha, "attention with its head reshapes and past concat -> MultiHeadAttention"),
    PassStep("lower-sdpa", lower_sdpa, "any attention fuse-mha could not absorb still runs as one op"),
    # Prefill of a generation needs the last position's logits only; the runtime says how many to keep.
    PassStep("keep-last-logits", keep_last_logits, "lm_head on kept positions only (1 when generating)"),
    # Fusions leave their intermediate functions and dead subgraphs (the unfused mask, cos/sin math).
    PassStep("inline-fusion-functions", common.InlinePass, "no rewriter-internal op reaches the runtime"),
    # fuse-gqa brackets attention with Transpose pairs that cancel once its neighbours are in place.
    PassStep("simplify-after-fusion", simplify_no_ops, "cancels Transpose/Reshape pairs the fusions leave"),
    PassStep("eliminate-identity-after-fusion", EliminateIdentity, "cancelled pairs leave Identity nodes"),
    # Once the Transpose pairs are gone, what is left around GQA are layout round trips it made: rotary can
    # read the flat layout itself, and the Reshape pairs on v and on the attention output undo each other.
    PassStep("rotary-bsd", rotary_bsd, "rotary on GQA's [B,S,H*d] layout: no Reshape/Transpose around it"),
    PassStep("collapse-reshapes", collapse_reshapes, "Reshape pairs that provably undo each other"),
    # Once q, k and v reach GQA straight from their projections (and rotary sits on the flat layout), the
    # three MatMuls become one and GQA rotates inside; before any precision pass, which then quantizes the
    # packed weight (block quantization along K gives the same codes as quantizing each part).
    PassStep("pack-qkv", pack_qkv, "Q/K/V as one MatMul read by GQA as packed QKV, rotary inside GQA"),
    PassStep("pack-gate-up", pack_gate_up, "a gated MLP's gate and up projections as one MatMul and a Split"),
    PassStep("lift-constants", lambda: common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
             "rewrites and inlined functions leave Constant nodes; weights belong in initializers"),
    # fuse-gqa re-derives past/total lengths from the inputs; the model read the same dims its own way.
    PassStep("cse-after-fusion", common.CommonSubexpressionEliminationPass, "one Shape/Slice per distinct dim read"),
    PassStep("remove-unused-after-fusion", common.RemoveUnusedNodesPass, "drops what the fusions orphaned"),
    PassStep("remove-unused-opsets-after-fusion", common.RemoveUnusedOpsetsPass, "opset imports match the ops"),
]

PORTABLE_FUSIONS = [
    # Standard ONNX ops only (TensorRT parses no com.microsoft ops); the graph is captured at opset 23.
    PassStep("fuse-onnx23", fuse_onnx23, "RMSNormalization, RotaryEmbedding, Attention as opset-23 ops"),
    PassStep("remove-unused-after-fusion", common.RemoveUnusedNodesPass, "drops what the fusions orphaned"),
]

PIPELINES: dict[tuple[str, int], list[PassStep]] = {
    ("ort", 0): [],
    ("ort", 1): CLEANUP,
    ("ort", 2): CLEANUP + ORT_FUSIONS,
    ("trt", 0): [],
    ("trt", 1): CLEANUP,
    ("trt", 2): CLEANUP + PORTABLE_FUSIONS,
}


USE_PLUGINS = "use-trt-plugins"


def all_pass_names() -> list[str]:
    names: list[str] = []
    for steps in PIPELINES.values():
        names += [s.name for s in steps if s.name not in names]
    return names + [USE_PLUGINS, "remove-unused-after-plugins"]


def plugin_steps(target: str, opt_level: int, trt_version: tuple[int, ...] | None, disabled=()) -> list[PassStep]:
    """The pass that turns patterns TensorRT ``trt_version``'s parser lacks into luffy plugin nodes.

    It runs after the opt-level pipeline, whose cleanup leaves the patterns in their plain form, and
    before the precision passes: its rules match the fp32 patterns, and fp16's Casts would split them.
    Nothing at -O0 (the graph as exported), for the ORT target, or where no plugin is needed.

    >>> [s.name for s in plugin_steps("trt", 2, (10, 8))]
    ['use-trt-plugins', 'remove-unused-after-plugins']
    >>> plugin_steps("trt", 2, (10, 15))
    []
    """
    if target != "trt" or opt_level == 0 or USE_PLUGINS in disabled or trt_version is None:
        return []
    plugins = plugins_for_tensorrt(trt_version)
    if not plugins:
        return []
    steps = [PassStep(USE_PLUGINS, lambda: use_plugins(plugins),
                     "one TensorRT plugin node per pattern the parser has no op for; ORT runs its function"),
            PassStep("remove-unused-after-plugins", common.RemoveUnusedNodesPass,
                     "drops the constants (eps, exponents) of the patterns replaced")]
    return [s for s in steps if s.name not in disabled]


def pipeline(target: str, opt_level: int, disabled=(), enabled=()) -> list[PassStep]:
    """The ordered passes for ``target`` at ``opt_level``, minus ``disabled``, plus ``enabled`` ones from -O2.

    >>> [s.name for s in pipeline("ort", 1, disabled=["cse"])][:3]
    ['inline', 'fold-constants', 'eliminate-identity']
    """
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if opt_level not in OPT_LEVELS:
        raise UsageError(f"opt level {opt_level!r} is out of range; choose 0, 1 or 2"
                         + (" (-O3 ran the -O2 passes and was removed)" if opt_level == 3 else ""))
    known = all_pass_names()
    for name in (*disabled, *enabled):
        if name not in known:
            raise UsageError(f"unknown pass {name!r}; known passes: {', '.join(known)}")
    chosen = {s.name for s in PIPELINES[(target, opt_level)]} | set(enabled)
    chosen -= set(disabled)
    # Keep the -O2 order for everything chosen, so enabling a pass never changes where it runs.
    return [s for s in PIPELINES[(target, max(OPT_LEVELS))] if s.name in chosen]


def precision_steps(
    precision: str, weights: WeightQuantization | None = None, target: str = "ort", reduce_range: bool = True,
) -> list[PassStep]:
    """The passes that set ``precision``; they run after the opt-level pipeline, on the fused graph.

    Last, because quantization replaces MatMul with MatMulNBits and fp16 inserts Casts: every fusion
    above matches fp32 MatMul/norm/attention patterns, and the lm_head and attention ops it quantizes
    around must already be in their final form. The cleanup after them drops the fp32 weights they
    replaced.

    >>> [s.name for s in precision_steps("fp16")]
    ['convert-fp16', 'remove-unused-after-precision']
    """
    cleanup = PassStep("remove-unused-after-precision", common.RemoveUnusedNodesPass, "drops the replaced fp32 weights")
    if precision == "fp32":
        return []
    if precision == "fp16":
        return [PassStep("convert-fp16", convert_fp16, "half the bytes; fp32 kept for reductions and logits"), cleanup]
    if precision == "bf16":
        return [PassStep("convert-bf16", convert_bf16, "half the bytes, fp32's range; fp16's fp32 islands"), cleanup]
    if precision in ("int4", "int8"):
        spec = weights or WeightQuantization(bits=4 if precision == "int4" else 8)
        if target == "trt":
            spec = dataclasses.replace(spec, layout="qdq", symmetric=True, quantize_embeddings=False)
        steps = [PassStep("quantize-weights", lambda: quantize_weights(spec),
                          "decode reads every weight once per token: fewer bytes, faster tokens")]
        if spec.layout != "qdq":  # fuse-moe is an ORT fusion: a TensorRT graph has no MoE node to quantize
            steps.append(PassStep("quantize-moe", lambda: quantize_moe(spec),
                                  "a fused MoE's experts are most of the weights and no MatMul: QMoE reads them in int4/int8"))
        return [*steps, cleanup]
    if precision == "int8-dynamic" and target == "trt":
        raise UsageError("int8-dynamic is an ONNX Runtime mode; for TensorRT use int8 (QDQ weights)")
    if precision == "int8-dynamic":
        return [PassStep("quantize-dynamic-int8", lambda: quantize_dynamic_int8(reduce_range),
                         "int8 weights and int8 products, activation scales found at run time"), cleanup]
    raise UsageError(f"precision {precision!r} has no pass list")


def kv_cache_steps(dtype: str, ranges=None, target: str = "ort") -> list[PassStep]:
    """The pass that sets the KV cache's precision ("auto": the compute's, nothing to do; "fp32" is the compute's
    too, since fp16 compute refuses it before capture): GroupQueryAttention's own cache types for ONNX Runtime,
    the graph's cache inputs and outputs for TensorRT.

    >>> [s.name for s in kv_cache_steps("int8")], [s.name for s in kv_cache_steps("int8", target="trt")]
    (['kv-cache-dtype'], ['kv-cache-io'])
    """
    if dtype in ("auto", "fp32"):
        return []
    why = "long-context decode reads the cache, and it bounds the sequences held: fewer bytes per token"
    if target == "trt":
        return [PassStep("kv-cache-io", lambda: kv_cache_io(dtype, ranges), why)]
    return [PassStep("kv-cache-dtype", lambda: kv_cache_dtype(dtype, ranges), why)]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a compile: its passes are built from the graph the stages before it left."""

    name: str
    steps: Callable[[ir.Model], list[PassStep]]
    numeric_check: bool  # --verify holds the stage to fp32 parity; a precision stage is judged by --eval
    why: str


def stages(
    target: str, opt_level: int, precision: str, *, disabled=(), enabled=(), target_steps: list[PassStep] = (),
    weights: Callable[[ir.Model], WeightQuantization | None] = lambda model: None, reduce_range: bool = True,
    kv_cache: str = "auto", kv_ranges: Callable[[ir.Model], dict | None] = lambda model: None,
) -> list[Stage]:
    """Everything one compile runs over the captured graph, in order. Unknown passes, levels and precisions
    the target cannot take fail here, before capture.

    ``target_steps`` are the target's own passes (TensorRT's plugins); ``weights(model)`` gives the precision
    passes their quantization spec from the graph they will quantize (GPTQ calibrates on it); ``kv_ranges(model)``
    gives an int8/int4 ``kv_cache`` its calibrated key/value ranges, measured on the graph that will run (it is called
    for every reduced cache, fp16 included, with the graph before the cache is reduced).

    >>> [s.name for s in stages("ort", 2, "int4")]
    ['opt-level', 'target', 'precision', 'kv-cache']
    """
    level = pipeline(target, opt_level, disabled, enabled)
    precision_steps(precision, target=target)  # validates the pair now, not after minutes of capture

    def precision_stage(model: ir.Model) -> list[PassStep]:
        if precision == "fp32":
            return []
        return precision_steps(precision, weights(model), target, reduce_range)

    def kv_stage(model: ir.Model) -> list[PassStep]:
        if kv_cache in ("auto", "fp32"):
            return []
        ranges = kv_ranges(model)  # called for fp16 too: the compiler measures --eval's reference on this graph
        return kv_cache_steps(kv_cache, ranges if kv_cache in ("int8", "int4") else None, target)

    return [
        Stage("opt-level", lambda model: level, True, f"-O{opt_level}: cleanup and fusions on the fp32 graph"),
        # After the opt level, whose cleanup leaves the patterns the plugins match in their plain form, and
        # before precision, whose Casts and quantized MatMuls would split them.
        Stage("target", lambda model: list(target_steps), True, "ops the target's runtime lacks, as plugins"),
        # Last: quantization and fp16 match the fused fp32 graph, and a fusion never sees a quantized node.
        Stage("precision", precision_stage, False, f"{precision}: weights (and activations) in fewer bytes"),
        # After precision: the cache's type pairs with the compute type that stage left, and int8/int4 scales are
        # calibrated on the graph as it will run (quantized weights included).
        Stage("kv-cache", kv_stage, False, f"KV cache {kv_cache}"),
    ]
