"""The streamed capture: a Hugging Face safetensors directory becomes the full-depth step graph without loading it.

    config.json ──▶ skeleton (no bytes): parameter names/shapes/ties, layer kinds, KV layout
    *.safetensors ─▶ Checkpoint: headers only; checked against the skeleton before any work
    template: the first T layers (T = 2 for uniform models), exported by torch.export + torch.onnx on
              zero-byte parameters (optimize off: nothing to fold yet)
    stamp.py: the template's layers stamped across the depth
    weights:  every parameter initializer becomes a CheckpointTensor (read when written); layout transforms
              of them become DerivedTensors (lazy.py)
    then the exporter's own optimizer, as torch.onnx runs it with optimize=True on a whole-model export

The result is the graph the whole-model capture produces (same nodes, by construction of the stamp and the
same optimizer), whose weights are still on disk. The pass pipeline runs on it unchanged; passes that make new
weights from lazy ones make them lazy too (quantize-weights), and the artifact's external data is written one
tensor at a time. What cannot be stamped raises `StreamFallback` with a one-line reason; compile then takes
the whole-model path and says why in the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from ...errors import CaptureError
from ..capture.torch_export import (Captured, KVLayout, _DecoderStep, _drop_build_metadata, _exportable_experts,
                                    _name_decoder_dims, _quiet_export, decoder_example, decoder_io_names, export_error,
                                    probe_kv_layout)
from ..config import CALIBRATED_KV
from ..sources.preflight import check_checkpoint
from ..sources.resolve import CAUSAL_LM
from ..sources.torch_model import _from_hf_model, _transformers_kind
from .checkpoint import Checkpoint, CheckpointTensor, check_parameters
from .lazy import fold_weight_transforms
from .skeleton import (decoder_layers, empty_model, ignorable_keys, layer_kinds, load_config, model_names,
                       parameter_table, reduced_config, template_depth)
from .stamp import StampError, stamp

WRAPPER = "model."  # capture's step wrapper holds the transformers model as its attribute `model`


class StreamFallback(Exception):
    """The streamed capture does not apply; ``str(self)`` is the one-line reason for the report."""


@dataclass
class Streamed:
    """What the streamed capture hands the rest of the compile besides the graph."""

    checkpoint: Checkpoint
    config: object
    skeleton: object  # the full-depth model with zero-byte parameters (names, config, generation ids)
    layers_prefix: str  # e.g. "model.layers" (without the wrapper's prefix)
    kinds: list[str]
    template_layers: int
    keys: dict[str, str]  # parameter name -> checkpoint key
    estimate: object = None  # preflight.Estimate

    def describe(self) -> dict:
        """The compile report's record of the streamed capture."""
        return {"layers": len(self.kinds), "template_layers": self.template_layers,
                "layer_kinds": sorted(set(self.kinds)) if len(set(self.kinds)) > 1 else "uniform",
                "checkpoint_tensors": len(self.checkpoint.entries), "checkpoint_bytes": self.checkpoint.nbytes}


def capture_streamed(path: Path, opset: int, say=lambda message: None, room=lambda checkpoint: None):
    """(Captured, Streamed) for the HF directory ``path``; raises StreamFallback when it cannot be streamed.
    ``room(checkpoint)`` runs once the checkpoint's headers are read and checked, before any work (preflight)."""
    config = load_config(path)
    if _transformers_kind(config) != CAUSAL_LM:
        raise StreamFallback(f"{config.model_type} is not a causal LM; encoders are captured whole")
    checkpoint = Checkpoint(path)
    skeleton = empty_model(config)
    keys = _check_checkpoint(checkpoint, skeleton)
    estimate = room(checkpoint)
    prefix, layers = decoder_layers(skeleton)
    kinds = layer_kinds(skeleton, layers)
    depth = template_depth(kinds)
    if depth is None:
        raise StreamFallback(f"its {len(kinds)} layers are of {len(set(kinds))} kinds in no pattern that repeats "
                             "within 8 layers")
    say(f"exporting a {depth}-layer template of {len(kinds)} layers")
    program, template_kv = _export_template(reduced_config(config, depth), opset)
    model = program.model
    try:
        stamp(model, WRAPPER + prefix, kinds[:depth], kinds)
    except StampError as exc:
        raise StreamFallback(f"the layer template cannot be stamped: {exc}") from None
    _attach_weights(model, checkpoint, keys)
    folded = fold_weight_transforms(model)
    program.model = model
    program.optimize()  # what torch.onnx.export(optimize=True) runs on a whole-model export
    model = program.model
    _drop_build_metadata(model)
    kv = KVLayout(len(kinds), _per_layer(template_kv.kv_heads, kinds, depth), _per_layer(template_kv.head_dims, kinds, depth),
                  template_kv.dtype)
    _name_decoder_dims(model, kv)
    streamed = Streamed(checkpoint, config, skeleton, prefix, kinds, depth, keys, estimate)
    notes = [f"streamed: {depth}-layer template stamped across {len(kinds)} layers; {folded} weight transforms "
             "deferred to the write"]
    return Captured(model, CAUSAL_LM, kv, reference=None, example=None, notes=notes), streamed


def capture_hf(path: Path, opset: int, cfg, say, output: Path):
    """(Captured, TorchModel, Streamed, None) for a directory the streamed path takes, or (None, None, None,
    reason) when it does not; errors in the checkpoint itself are raised (the whole-model path would meet them too).
    The TorchModel wraps the zero-byte skeleton: names, config, generation ids, tokenizer, never weights."""
    try:
        require_supported(cfg)
        captured, streamed = capture_streamed(path, opset, say, lambda ckpt: check_checkpoint(ckpt, cfg, output, True))
    except StreamFallback as exc:
        return None, None, None, str(exc)
    if cfg.kv_cache_dtype in CALIBRATED_KV:
        source = f"--kv-calib {cfg.kv_calib}" if cfg.kv_calib else f"--calib {cfg.calib}"
        captured.notes.append(f"--kv-cache-dtype {cfg.kv_cache_dtype}: its scales are calibrated on {source} region "
                              "by region, one layer's weights at a time (stream/calibration.py)")
    return captured, _torch_model(path, streamed.skeleton), streamed, None


def _torch_model(path: Path, skeleton):
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        skeleton.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return _from_hf_model(skeleton, tokenizer_dir=path)


def _check_checkpoint(checkpoint: Checkpoint, skeleton) -> dict[str, str]:
    params, aliases = parameter_table(skeleton)
    names, converted = model_names(skeleton, sorted(checkpoint.entries))
    if converted:
        raise StreamFallback(f"transformers converts checkpoint tensors such as {converted[0]} on load (they become "
                             "parts of other tensors), which the streamed path does not replay")
    # persistent buffers a checkpoint may carry: read from it when there (transformers loads them), else the
    # module's own value
    buffers = {name: names[name] for name in skeleton.state_dict() if name not in params and name in names}
    ignorable = ignorable_keys(skeleton) + [f"^{re.escape(key)}$" for key in buffers.values()]
    return {**check_parameters(checkpoint, params, aliases, names, ignorable), **buffers}


def _per_layer(values: list, kinds: list[str], depth: int) -> list:
    """A per-layer KV property of the template, extended to every layer by kind."""
    by_kind = {kinds[i]: values[i] for i in range(depth)}
    return [by_kind[k] for k in kinds]


def _export_template(config, opset: int):
    """(ONNXProgram of the raw export, its KV layout) for the reduced-depth ``config`` on zero-byte parameters."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    template = empty_model(config)
    with FakeTensorMode(allow_non_fake_inputs=True):
        kv = probe_kv_layout(template)
    step = _DecoderStep(template)
    args = decoder_example(kv, vocab=getattr(config, "vocab_size", 8))
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                      "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past} for _ in range(2 * kv.num_layers)]}
    input_names, output_names = decoder_io_names(kv.num_layers)
    try:
        with _quiet_export(), _exportable_experts(step.module):
            program = torch.onnx.export(
                step.module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, opset_version=opset, optimize=False, verbose=False, external_data=False)
    except Exception as exc:  # torch.export raises a zoo of types; all mean "could not capture"
        raise export_error(step.module, exc) from exc
    return program, kv


def _attach_weights(model: ir.Model, checkpoint: Checkpoint, keys: dict[str, str]) -> None:
    """Every parameter initializer reads its checkpoint tensor; none may keep the template's zero-byte value."""
    for name, value in model.graph.initializers.items():
        param = name[len(WRAPPER):] if name.startswith(WRAPPER) else name
        if param in keys:
            value.const_value = CheckpointTensor(checkpoint, keys[param], name=name)
        elif _is_empty(value.const_value):
            raise CaptureError(f"initializer {name} has no checkpoint tensor (parameter {param} unknown to the model)")


def _is_empty(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    stride = getattr(raw, "stride", None)
    return callable(stride) and raw.numel() > 1 and 0 in raw.stride()


def require_supported(cfg) -> None:
    """Options the streamed path does not take yet: refused as fallbacks with their reason. (An int8/int4 KV cache
    is streamed: its scales are calibrated region by region, stream/calibration.py.)"""
    if cfg.precision in ("fp16", "bf16", "int8-dynamic"):
        raise StreamFallback(f"--precision {cfg.precision} converts every weight in one pass over the whole graph")
    if cfg.target != "ort":
        raise StreamFallback("--target trt builds its engine from the whole graph")
    if cfg.verify or cfg.dump_ir:
        raise StreamFallback("--verify and --dump-ir run every pass's graph on ONNX Runtime, weights and all")
