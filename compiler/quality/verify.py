"""--verify: after every pass, the ONNX checker, strict shape inference and a numeric check on ORT.

The references are the CAPTURED graph's own outputs on ONNX Runtime, so each pass is judged against what
it was handed, and a failure names the pass that broke things (the final parity check only says that
something did). ORT runs with graph optimizations off: its own fusions must not hide a broken rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ...errors import CaptureError, UsageError
from ...passes.driver import initializer_bytes
from ...runtimes.ort_compat import session_options
from ..capture.torch_export import Captured, decoder_example, decoder_io_names
from ..sources.resolve import CAUSAL_LM
from .parity import DECODER_CASES, FP32_ATOL, _flatten, _real_positions, buffer_positions
from .step_io import run_step

POSITIONS = "position_ids"
SYMBOLIC_DIM = 2  # the size a synthesized input gets for every named (dynamic) dim
MAX_PROTO_BYTES = 2 << 30  # protobuf's limit: --verify hands ORT the model in memory
# Domains whose ops ONNX Runtime's CPU provider executes (ONNX's own and ORT's contrib domains).
RUNTIME_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc")
_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}
_INTS = {ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
         ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64}


@dataclass
class Case:
    """One set of sample inputs; ``valid(name, err)`` picks the output elements that count (None: all)."""

    label: str
    feeds: dict[str, np.ndarray]
    valid: Callable[[str, np.ndarray], np.ndarray] | None = None


class Verifier:
    """The ``after_pass`` hook of run_passes: returns ``{"verified": True, "max_abs_diff": d}`` or raises."""

    checks_numerics = True  # holds every pass to fp32 parity, so precision passes skip it

    def __init__(self, captured: Captured, vocab: int | None = None):
        weight_bytes = initializer_bytes(captured.model)
        if weight_bytes >= MAX_PROTO_BYTES:
            raise UsageError(f"--verify checks models under 2 GiB of weights in memory; this one has {weight_bytes / 2**30:.1f} GiB")
        self.cases = sample_cases(captured, vocab)
        # A graph that is broken before any pass runs is capture's fault, not the first pass's.
        proto = checked_proto(captured.model, "--verify: capture")
        self.references = run_cases(proto, self.cases, "--verify: capture")
        # A pass may move the rotation into attention, which then numbers positions by KV buffer index
        # (pack-qkv; see parity.buffer_positions): from that pass on, the references are the captured graph's
        # with those positions.
        self.buffer_cases = self.buffer_references = None
        if captured.kind == CAUSAL_LM and POSITIONS in {v.name for v in captured.model.graph.inputs}:
            self.buffer_cases = sample_cases(captured, vocab, numbered_by_buffer=True)
            self.buffer_references = run_cases(proto, self.buffer_cases, "--verify: capture")
        self.deferred: list[str] = []  # passes whose graphs could not run; the next runnable one covers them

    def __call__(self, pass_name: str, model: ir.Model) -> dict:
        where = f"--verify: pass {pass_name!r}"
        proto = checked_proto(model, where)
        internal = internal_op(proto)
        if internal is not None:
            # A multi-pass rewrite (fuse-sdpa ... lower-sdpa) may hold an op of its own between passes that
            # no runtime executes; the numbers are checked at the next graph that runs, naming the span.
            self.deferred.append(pass_name)
            return {"verified": False, "max_abs_diff": None,
                    "verify_deferred": f"holds {internal}, which no runtime executes; checked with the next runnable pass"}
        covers, self.deferred = self.deferred, []
        if covers:
            where += f" (checked together with {', '.join(map(repr, covers))}, whose graphs could not run)"
        cases, references = self.cases, self.references
        if self.buffer_cases is not None and POSITIONS not in {v.name for v in model.graph.inputs}:
            cases, references = self.buffer_cases, self.buffer_references
        got = run_cases(proto, cases, where)
        worst = 0.0
        for case, expected, actual in zip(cases, references, got):
            for name, ref in expected.items():
                worst = max(worst, _compare(f"{where} broke parity: output {name} ({case.label})", case, name, actual.get(name), ref))
        return {"verified": True, "max_abs_diff": worst, **({"verify_covers": covers} if covers else {})}


def _compare(failure: str, case: Case, name: str, got: np.ndarray | None, ref: np.ndarray) -> float:
    if got is None:
        raise CaptureError(f"{failure} is gone")
    if got.shape != ref.shape:
        raise CaptureError(f"{failure} has shape {list(got.shape)}, the captured graph's has {list(ref.shape)}")
    if ref.dtype.kind not in "biuf":  # strings and other non-numbers have no distance
        return 0.0
    diff = max_abs_diff(got, ref, None if case.valid is None else case.valid(name, ref))
    if diff > FP32_ATOL:
        raise CaptureError(f"{failure} differs by {diff:.1e} > {FP32_ATOL:.0e}")
    return diff


def sample_cases(captured: Captured, vocab: int | None = None, numbered_by_buffer: bool = False) -> list[Case]:
    """Decoders: prefill- and decode-shaped steps (``numbered_by_buffer``: positions = KV buffer index);
    torch sources: their example; ONNX files: synthesized."""
    inputs = list(captured.model.graph.inputs)
    if captured.kind == CAUSAL_LM:
        width = vocab or _logits_width(captured.model)
        return [_decoder_case(captured, label, shape, width, numbered_by_buffer) for label, shape in DECODER_CASES]
    return [Case("example", _complete(_example_feeds(captured.example, inputs), inputs))]


def _decoder_case(captured: Captured, label: str, shape: dict, vocab: int, numbered_by_buffer: bool) -> Case:
    args = decoder_example(captured.kv, vocab=vocab, seed=17, **shape)
    args = buffer_positions(args) if numbered_by_buffer else args
    names = decoder_io_names(captured.kv.num_layers)[0]
    feeds = {n: t.numpy() for n, t in zip(names, _flatten(list(args)))}
    mask, past = feeds["attention_mask"].astype(bool), shape["past"]

    def valid(name, err):
        # Padding positions compute unspecified values (see parity._real_positions); other outputs count whole.
        if name == "logits" or name.startswith("present."):
            return _real_positions(name, err, mask, past)
        return np.ones(err.shape, dtype=bool)

    inputs = list(captured.model.graph.inputs)
    return Case(label, _complete({n: v for n, v in feeds.items() if n in {i.name for i in inputs}}, inputs), valid)


def _logits_width(model: ir.Model) -> int:
    # An ONNX-file decoder has no config; a static vocab dim on logits bounds the sample ids instead.
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    width = logits.shape[-1] if logits is not None and logits.shape is not None else None
    return width if isinstance(width, int) else 8


def _example_feeds(example, inputs: list[ir.Value]) -> dict[str, np.ndarray]:
    if example is None:
        return {}
    args, kwargs = example
    if kwargs:
        return {k: t.detach().numpy() for k, t in kwargs.items() if hasattr(t, "detach")}
    flat = _flatten(list(args))
    # The exporter drops inputs the module never reads; positions only line up when nothing was dropped.
    return {v.name: t.detach().numpy() for v, t in zip(inputs, flat)} if len(flat) == len(inputs) else {}


def _complete(feeds: dict[str, np.ndarray], inputs: list[ir.Value]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {v.name: feeds[v.name] if v.name in feeds else synthesize(v, rng) for v in inputs}


def synthesize(value: ir.Value, rng: np.random.Generator) -> np.ndarray:
    """A sample for graph input ``value``: named dims -> 2, ints in [0, 4) (safe as indices), floats ~ N(0, 1)."""
    where = f"--verify: cannot make a sample for graph input {value.name!r}"
    if not isinstance(value.type, ir.TensorType) or value.shape is None:
        raise UsageError(f"{where}: it is not a tensor of known rank ({value.type}, shape {value.shape})")
    shape = tuple(d if isinstance(d, int) else SYMBOLIC_DIM for d in value.shape)
    if value.dtype in _FLOATS:
        return rng.standard_normal(shape).astype(_FLOATS[value.dtype])
    if value.dtype in _INTS:
        return rng.integers(0, 4, shape).astype(value.dtype.numpy())
    if value.dtype == ir.DataType.BOOL:
        return np.ones(shape, dtype=bool)  # mask-like: all set, so no row is fully masked out
    raise UsageError(f"{where}: dtype {value.dtype.name} (float, int and bool inputs can be synthesized)")


def checked_proto(model: ir.Model, where: str) -> onnx.ModelProto:
    """``model`` as a proto that passed the ONNX checker and strict shape inference; else CaptureError."""
    proto = ir.serde.serialize_model(model)
    checkable = _runtime_ops_opaque(proto)
    try:
        onnx.checker.check_model(checkable, full_check=False)
    except Exception as exc:  # ValidationError, or a C++ error surfacing as something else
        raise CaptureError(f"{where} produced an invalid model: {_one_line(exc)}") from None
    try:
        onnx.shape_inference.infer_shapes(checkable, check_type=True, strict_mode=True)
    except Exception as exc:
        raise CaptureError(f"{where} produced a model that fails strict shape inference: {_one_line(exc)}") from None
    # Emission lowers the IR version the same way (compile._lower_ir_version, in _run_stages); ORT may not read the newest.
    needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    proto.ir_version = min(proto.ir_version, needed)
    return proto


OPAQUE_DOMAIN = "luffy.verify.runtime"


def _runtime_ops_opaque(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for the checker with default-domain ops ONNX does not define moved to a domain of their own.

    ORT registers some contrib ops (SimplifiedLayerNormalization) in the ONNX domain, and the fusions emit
    them there; the checker would call them unregistered. Moved, both checkers treat them as opaque, like
    com.microsoft ops; ORT still validates them when it loads the original. Only ops unknown to ONNX at
    every version move, so an ONNX op used above the model's opset is still an error.
    """
    def unknown_to_onnx(node):
        return node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)

    if not any(unknown_to_onnx(n) for n in _all_nodes(proto.graph)):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in filter(unknown_to_onnx, _all_nodes(copy.graph)):
        node.domain = OPAQUE_DOMAIN
    copy.opset_import.add(domain=OPAQUE_DOMAIN, version=1)
    return copy


def internal_op(proto: onnx.ModelProto) -> str | None:
    """The first node no runtime can execute: a domain neither ONNX nor ORT implements, and no local function."""
    local = {(f.domain, f.name) for f in proto.functions}
    for node in _all_nodes(proto.graph):
        if node.domain not in RUNTIME_DOMAINS and (node.domain, node.op_type) not in local:
            return f"{node.domain}::{node.op_type}"
    return None


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def run_cases(proto: onnx.ModelProto, cases: list[Case], where: str) -> list[dict[str, np.ndarray]]:
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # a failure becomes our one-line CaptureError; ORT need not log it too
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [run_step(session, case.feeds) for case in cases]
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        raise CaptureError(f"{where} produced a model ONNX Runtime cannot run: {_one_line(exc)}") from None


def max_abs_diff(got: np.ndarray, expected: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Largest |got - expected| over ``valid``; NaN against NaN counts as equal, NaN against a number as inf."""
    g, e = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(g == e, 0.0, np.abs(g - e))
    err[np.isnan(err)] = np.inf
    err[np.isnan(g) & np.isnan(e)] = 0.0
    if valid is not None:
        err = err[valid]
    return float(err.max()) if err.size else 0.0


def _one_line(exc: BaseException) -> str:
    # The checker spreads one sentence over lines ("input 'x' of node:\nname: ...\n is not output of ...")
    # and appends a "==> Context" dump; the sentence, joined, is what names the fault.
    text = " ".join(str(exc).split("==> Context")[0].split())
    return (text or type(exc).__name__)[:300]
