"""Capture a torch module into an onnx_ir model: torch.export, then torch.onnx's dynamo exporter.

A causal LM becomes ONE step graph that serves both prefill and decode:

    input_ids [batch, seq], attention_mask [batch, total], position_ids [batch, seq],
    past_key_values.N.key/value [batch, kv_heads, past, head_dim]
      -> logits [batch, seq, vocab], present.N.key/value [batch, kv_heads, total, head_dim]

with total = past + seq. The KV cache is explicit graph I/O so the runtime owns it (preallocated,
IO-bound); nothing in the graph holds state.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from dataclasses import dataclass, field

import onnx_ir as ir

from ...errors import CaptureError, UnsupportedModelError
from ..sources.resolve import CAUSAL_LM, ENCODER
from ..sources.torch_model import TorchModel

PAST_NAME = "past_key_values.{layer}.{kind}"
PRESENT_NAME = "present.{layer}.{kind}"
ONNX_OPSET = 20  # the ORT target: ORT >= 1.17 runs it, and its contrib fusions are written against it
# Per target: TensorRT reads standard ONNX only, and at opset 23 torch.onnx itself emits RMSNormalization,
# RotaryEmbedding and Attention (the portable path), which ORT >= 1.22 also runs.
CAPTURE_OPSET = {"ort": ONNX_OPSET, "trt": 23}


@dataclass
class KVLayout:
    """Shape of the explicit KV cache; one entry per layer in ``kv_heads`` / ``head_dims``."""

    num_layers: int
    kv_heads: list[int]
    head_dims: list[int]
    dtype: str = "float32"
    layout: str = "batch,kv_heads,seq,head_dim"

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int4": 0.5}.get(self.dtype, 4)

    def to_json(self) -> dict:
        uniform = len(set(self.kv_heads)) == 1 and len(set(self.head_dims)) == 1
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.kv_heads[0] if uniform else self.kv_heads,
            "head_dim": self.head_dims[0] if uniform else self.head_dims,
            "dtype": self.dtype,
            "layout": self.layout,
            "past_input": PAST_NAME,
            "present_output": PRESENT_NAME,
            "bytes_per_token": int(sum(2 * h * d * self.itemsize for h, d in zip(self.kv_heads, self.head_dims))),
        }


@dataclass
class Captured:
    model: ir.Model
    kind: str
    kv: KVLayout | None = None
    reference: object = None  # the torch module that was exported, for the parity check
    example: object = None  # (args, kwargs) it was exported with
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet_export():
    # torch.onnx prints progress lines and torch.export warns about internals the user cannot act on;
    # luffy reports its own progress instead. Real failures still raise.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# transformers' mixture-of-experts layers dispatch on config._experts_implementation. Its default,
# "grouped_mm", calls a custom op on CPU (transformers::grouped_mm_fallback) that torch.onnx cannot
# translate, and "eager" loops over the experts a batch happens to hit (nonzero + a Python loop, which
# torch.export cannot trace: "Could not guard on data-dependent expression"). "batched_mm" gathers each
# token's top-k expert weights and runs one batched matmul: static shapes, plain ops, the same math.
EXPORTABLE_EXPERTS = "batched_mm"


@contextlib.contextmanager
def _exportable_experts(module):
    """Switch the transformers model inside ``module`` to the exportable experts path while it is exported,
    and back after, so the parity check compares the graph with the model's own default path."""
    model = next((m for m in module.modules() if hasattr(m, "set_experts_implementation")), None)
    if model is None or not model._can_set_experts_implementation():  # no experts layer: nothing to switch
        yield
        return
    before = model.get_experts_implementation()
    model.set_experts_implementation(EXPORTABLE_EXPERTS)
    try:
        yield
    finally:
        model.set_experts_implementation(before)


def _export(module, args, kwargs, dynamic_shapes, input_names, output_names, opset=ONNX_OPSET) -> ir.Model:
    import torch

    try:
        with _quiet_export(), _exportable_experts(module):
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=output_names, opset_version=opset,
                optimize=True, verbose=False, external_data=False,
            )
    except Exception as exc:  # torch.export raises a zoo of types; all mean "could not capture"
        raise export_error(module, exc) from exc
    _drop_build_metadata(program.model)
    return program.model


# Per-node metadata torch.onnx attaches. Stack traces and FX dumps hold this machine's paths and are most
# of a small model's bytes; an artifact must not depend on (or leak) where it was built. name_scopes stays:
# it says which module (layer) a node came from, which per-layer reports need.
_BUILD_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "namespace")


def _drop_build_metadata(model: ir.Model) -> None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in _BUILD_METADATA:
            node.metadata_props.pop(key, None)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NO_ONNX_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'[^>]*>\.?(?: Failure message: ([^\n]+))?")


def export_error(module, exc: BaseException):
    """One line out of torch.onnx's multi-page failure: the op without an ONNX translation, or the summary."""
    text = _ANSI.sub("", str(exc))
    owner = type(getattr(module, "model", module)).__name__
    missing = _NO_ONNX_FUNCTION.search(text)
    if missing:
        # A common op that fails only on complex tensors (Llama4's rotary: aten.unsqueeze) would otherwise be
        # blamed as if torch.onnx could not translate it at all.
        where = " for complex-valued inputs" if "complex-valued input" in (missing.group(2) or "") else ""
        return UnsupportedModelError(
            f"{owner}: op {missing.group(1)} has no ONNX translation in torch.onnx{where}, so the model cannot be captured"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        summary = lines[lines.index("## Exception summary") + 1:]
        if summary:
            return CaptureError(f"{owner}: torch.onnx export failed: {summary[0]}")
    return CaptureError(f"{owner}: torch.onnx export failed: {type(exc).__name__}: {lines[0] if lines else ''}")


def _cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    out = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.dim() != 4 or values.dim() != 4:
            return None
        out.append((keys, values))
    return out


class _DecoderStep:
    """Builds the step wrapper: flat past tensors in, logits and flat present tensors out."""

    def __init__(self, model):
        import torch

        self.model = model
        params = inspect.signature(model.forward).parameters
        self.takes_position_ids = "position_ids" in params

        class Step(torch.nn.Module):
            def __init__(inner):
                super().__init__()
                inner.model = model

            def forward(inner, input_ids, attention_mask, position_ids, past):
                from transformers import DynamicCache

                # A config-less DynamicCache keeps every layer in full (no sliding-window truncation), so
                # present is always past + seq long; sliding windows are still applied by the model's mask.
                cache = DynamicCache()
                for i in range(len(past) // 2):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                extra = {"position_ids": position_ids} if self.takes_position_ids else {}
                out = inner.model(
                    input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                    use_cache=True, return_dict=True, **extra,
                )
                flat = []
                for k, v in _cache_layers(out.past_key_values):
                    flat += [k, v]
                return (out.logits.float(), *flat)

        self.module = Step().eval()


def probe_kv_layout(model) -> KVLayout:
    """Run one tiny forward pass and read the per-layer KV shapes off the returned cache."""
    import torch
    from transformers import DynamicCache

    ids = torch.zeros((1, 2), dtype=torch.long)
    with torch.no_grad():
        try:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(), use_cache=True)
        except Exception as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__}: forward with a DynamicCache failed ({type(exc).__name__}: {exc}); "
                "luffy captures models whose cache is a per-layer key/value cache"
            ) from None
    layers = _cache_layers(getattr(out, "past_key_values", None))
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: returned cache {type(getattr(out, 'past_key_values', None)).__name__} is not a "
            "per-layer [batch, heads, seq, head_dim] key/value cache (recurrent and hybrid models are not supported)"
        )
    dtype = str(layers[0][0].dtype).replace("torch.", "")
    return KVLayout(len(layers), [k.shape[1] for k, _ in layers], [k.shape[3] for k, _ in layers], dtype)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past, present = [], []
    for layer in range(num_layers):
        for kind in ("key", "value"):
            past.append(PAST_NAME.format(layer=layer, kind=kind))
            present.append(PRESENT_NAME.format(layer=layer, kind=kind))
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def decoder_example(kv: KVLayout, batch=2, seq=3, past=4, vocab=8, seed=0):
    """Inputs for the step graph: row 0 left-padded by one token so the export sees a real padding mask."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    mask[0, 0] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kvs = []
    for h, d in zip(kv.kv_heads, kv.head_dims):
        kvs += [torch.randn(batch, h, past, d, generator=gen), torch.randn(batch, h, past, d, generator=gen)]
    return ids, mask, pos, kvs


def _decoder_reference(tm: TorchModel):
    """(KV layout, the step wrapper the graph is exported from, its example inputs)."""
    kv = probe_kv_layout(tm.module)
    return kv, _DecoderStep(tm.module), decoder_example(kv, vocab=getattr(tm.module.config, "vocab_size", 8))


def capture_causal_lm(tm: TorchModel, opset: int = ONNX_OPSET) -> Captured:
    import torch

    kv, step, args = _decoder_reference(tm)
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past} for _ in range(2 * kv.num_layers)],
    }
    input_names, output_names = decoder_io_names(kv.num_layers)
    model = _export(step.module, args, None, dynamic_shapes, input_names, output_names, opset)
    _name_decoder_dims(model, kv)
    notes = [] if step.takes_position_ids else ["model takes no position_ids; the graph input was dropped"]
    return Captured(model, CAUSAL_LM, kv, reference=step.module, example=(args, None), notes=notes)


def _name_decoder_dims(model: ir.Model, kv: KVLayout) -> None:
    # The exporter names dims after torch's symbols ("s0", "past + seq"); the manifest and users want the
    # documented names, so graph I/O is renamed to batch / seq / past / total.
    names = {
        "input_ids": ["batch", "seq"], "attention_mask": ["batch", "total"], "position_ids": ["batch", "seq"],
    }
    for value in model.graph.inputs:
        if value.name in names:
            value.shape = ir.Shape(names[value.name])
        elif value.name.startswith("past_key_values."):
            layer = int(value.name.split(".")[1])
            value.shape = ir.Shape(["batch", kv.kv_heads[layer], "past", kv.head_dims[layer]])
    for value in model.graph.outputs:
        if value.name == "logits":
            value.shape = ir.Shape(["batch", "seq", value.shape[2] if value.shape is not None else "vocab"])
        elif value.name.startswith("present."):
            layer = int(value.name.split(".")[1])
            value.shape = ir.Shape(["batch", kv.kv_heads[layer], "total", kv.head_dims[layer]])


def encoder_example(module, batch=2, seq=5):
    import torch

    config = module.config
    ids = torch.randint(0, min(getattr(config, "vocab_size", 8), 100), (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    params = inspect.signature(module.forward).parameters
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0) > 0:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def _encoder_reference(tm: TorchModel):
    """(the module the graph is exported from: the encoder returning its tensor outputs as a tuple, its
    example inputs, the outputs' names)."""
    import torch

    inputs = encoder_example(tm.module)
    with torch.no_grad():
        out = tm.module(**inputs, return_dict=True)
    output_names = [k for k, v in out.items() if isinstance(v, torch.Tensor)]

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tm.module

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            result = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)
            return tuple(result[k] for k in output_names)

    return Encoder().eval(), inputs, output_names


def capture_encoder(tm: TorchModel, opset: int = ONNX_OPSET) -> Captured:
    import torch

    encoder, inputs, output_names = _encoder_reference(tm)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dynamic_shapes = {name: {0: batch, 1: seq} for name in inputs}
    model = _export(encoder, (), inputs, dynamic_shapes, list(inputs), output_names, opset)
    return Captured(model, ENCODER, reference=encoder, example=((), inputs))


def capture_module(tm: TorchModel, opset: int = ONNX_OPSET) -> Captured:
    import torch

    args, kwargs = _module_example(tm)
    dynamic_shapes = tm.dynamic_shapes
    if dynamic_shapes is None:
        # Let torch.export decide which dims can vary; it keeps the rest static instead of failing.
        def auto(x):
            return {i: torch.export.Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

        dynamic_shapes = tuple(auto(a) for a in args) if kwargs is None else {k: auto(v) for k, v in kwargs.items()}
    params = list(inspect.signature(tm.module.forward).parameters)
    input_names = params[: len(args)] if kwargs is None else None
    model = _export(tm.module, args, kwargs, dynamic_shapes, input_names, None, opset)
    return Captured(model, "module", reference=tm.module, example=(args, kwargs))


def _module_example(tm: TorchModel) -> tuple[tuple, dict | None]:
    example = tm.example_inputs
    return (example, None) if isinstance(example, tuple) else ((), example)


def reference_only(tm: TorchModel) -> Captured:
    """What the parity check compares a graph with, without exporting anything: the module the graph was
    captured from (the decoder's step wrapper, the encoder's output selection) and its example inputs.
    `luffy verify --parity` checks an existing artifact against its source this way."""
    if tm.kind == CAUSAL_LM:
        kv, step, args = _decoder_reference(tm)
        return Captured(None, CAUSAL_LM, kv, reference=step.module, example=(args, None))
    if tm.kind == ENCODER:
        encoder, inputs, _ = _encoder_reference(tm)
        return Captured(None, ENCODER, reference=encoder, example=((), inputs))
    return Captured(None, "module", reference=tm.module, example=_module_example(tm))