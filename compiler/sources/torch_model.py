"""Load what a resolved source names as a torch module (zoo, Hugging Face directory, factory, in-memory
module), with what the artifact needs to know about it: kind, tokenizer, generation ids, position limit.

Nothing here runs a model directory's own Python (trust_remote_code=False) or fetches from a hub.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import SourceError, UnsupportedModelError, first_line
from ...models_zoo import ZOO, build_tokenizer
from ...models_zoo.byte_tokenizer import BOS, EOS
from .resolve import CAUSAL_LM, ENCODER, MODULE, Source, is_torch_module


@dataclass
class TorchModel:
    """A torch module ready to capture, with what the artifact needs to know about it."""

    module: Any
    kind: str  # CAUSAL_LM, ENCODER or MODULE
    architecture: str
    example_inputs: Any = None  # MODULE only: tuple of args, or dict of kwargs
    dynamic_shapes: Any = None  # MODULE only, optional
    tokenizer: Any = None  # a tokenizers.Tokenizer, or None
    tokenizer_dir: Path | None = None  # HF dir whose tokenizer files are copied into the artifact
    generation: dict = field(default_factory=dict)  # bos/eos/pad token ids
    max_positions: int | None = None
    ignored_weights: list = field(default_factory=list)  # checkpoint tensors outside the model (an encoder's head)
    chat_template: str | None = None  # a zoo model's own (HF directories carry theirs in tokenizer files)
    special_tokens: dict | None = None  # bos_token / eos_token text the chat template writes

    @property
    def vocab_size(self) -> int | None:
        """The config's vocabulary size (what parity checks token ids against); None for a plain module."""
        return getattr(getattr(self.module, "config", None), "vocab_size", None)


def load_torch_model(src: Source) -> TorchModel:
    """Build the torch module a (non-ONNX) source describes."""
    if src.kind == "zoo":
        entry = ZOO[src.spec]
        module = entry.build_model()
        tm = _from_hf_model(module, tokenizer=build_tokenizer(entry))
        tm.chat_template = entry.chat_template
        tm.special_tokens = {"bos_token": BOS, "eos_token": EOS} if entry.chat_template else None
        return tm
    if src.kind == "hf-dir":
        return _load_hf_dir(src.path)
    if src.kind == "factory":
        return _load_factory(src.spec)
    if src.kind == "module":
        return _from_any_module(src.obj, None, None)
    raise SourceError(f"{src.spec}: source kind {src.kind} has no torch model")


def _transformers_kind(config) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return None
    archs = getattr(config, "architectures", None) or []
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    ):
        return CAUSAL_LM
    if model_type in MODEL_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return ENCODER
    return None


def _load_hf_dir(path: Path) -> TorchModel:
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{path}/config.json: transformers cannot read this config ({first_line(exc)})") from None
    except OSError as exc:
        raise SourceError(f"{path}/config.json: {first_line(exc)}") from None
    kind = _transformers_kind(config)
    if kind is None:
        archs = ",".join(getattr(config, "architectures", None) or [config.model_type])
        raise UnsupportedModelError(
            f"{path}: architecture {archs} (model_type={config.model_type}) is neither a causal LM nor an encoder "
            "that luffy can compile"
        )
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights and not list(path.glob("pytorch_model*.bin")):
        raise SourceError(f"{path}: no *.safetensors weights found")
    auto = transformers.AutoModelForCausalLM if kind == CAUSAL_LM else transformers.AutoModel
    try:
        # trust_remote_code=False: a model directory never runs its own Python here. transformers reads
        # safetensors, and .bin files only with torch.load(weights_only=True).
        module, loading = auto.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=False, use_safetensors=bool(weights), local_files_only=True,
            output_loading_info=True,
        )
    except Exception as exc:  # transformers raises many types for a bad checkpoint
        raise SourceError(f"{path}: cannot load weights ({type(exc).__name__}: {first_line(exc)})") from None
    ignored = require_complete_weights(path, module, loading, kind)
    torch_model = _from_hf_model(module.eval(), tokenizer_dir=path)
    torch_model.ignored_weights = ignored
    return torch_model


def require_complete_weights(path: Path, module, loading: dict, kind: str) -> list[str]:
    """Refuse a checkpoint that does not fill the module: transformers would initialize what is missing at
    random, and parity would then compare that random model with itself. Returns the unexpected tensors
    that are safely ignored (an encoder checkpoint's task head, e.g. BERT's ``cls.*``).

    A causal LM is the whole model, so any unexpected tensor means the config and the weights disagree
    (e.g. more layers in the file than in config.json). An encoder loaded as its base model may carry a
    head; a tensor under one of the base model's own submodules is refused all the same.
    """
    missing = sorted(loading.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in (loading.get("mismatched_keys") or [])]
    unexpected = sorted(loading.get("unexpected_keys") or [])
    if kind == CAUSAL_LM:
        refused_unexpected, ignored = unexpected, []
    else:
        prefix = getattr(module, "base_model_prefix", "") or ""
        children = {name for name, _ in module.named_children()}

        def inside_model(key: str) -> bool:
            key = key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key
            return key.split(".")[0] in children

        refused_unexpected = [k for k in unexpected if inside_model(k)]
        ignored = [k for k in unexpected if not inside_model(k)]
    for what, keys in (("missing", missing), ("of the wrong shape", mismatched), ("not in the model", refused_unexpected)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise SourceError(f"{path}: checkpoint tensors {what}: {shown}; the weights do not match config.json "
                              f"(a model with {len(keys)} tensor(s) left at random initialization is not compiled)")
    return ignored


def _module_kind(module) -> str | None:
    """Decide from the loaded class, not the config: a config's model_type (bert) can name both kinds."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    can_generate = getattr(module, "can_generate", None)
    if callable(can_generate) and can_generate():
        return CAUSAL_LM
    if not getattr(config, "is_decoder", False) and hasattr(module, "get_input_embeddings"):
        return ENCODER
    return None


def _from_hf_model(module, tokenizer=None, tokenizer_dir: Path | None = None) -> TorchModel:
    config = module.config
    kind = _module_kind(module)
    if kind is None:
        raise UnsupportedModelError(f"architecture {type(module).__name__} (model_type={config.model_type}) is not supported")
    gen = getattr(module, "generation_config", None)
    generation = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(gen, key, None) if gen is not None else None
        if value is None:
            value = getattr(config, key, None)
        generation[key] = value
    max_positions = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            max_positions = getattr(config, key)
            break
    return TorchModel(
        module=module.eval(), kind=kind, architecture=type(module).__name__, tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir, generation=generation, max_positions=max_positions,
    )


def _from_any_module(module, example_inputs, dynamic_shapes) -> TorchModel:
    if example_inputs is None and _module_kind(module) is not None:
        return _from_hf_model(module)
    if example_inputs is None:
        raise SourceError(f"{type(module).__name__}: not a transformers model, so example inputs are needed")
    return TorchModel(
        module=module.eval(), kind=MODULE, architecture=type(module).__name__,
        example_inputs=example_inputs, dynamic_shapes=dynamic_shapes,
    )


def _load_factory(spec: str) -> TorchModel:
    module_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(f"{spec}: cannot import {module_name} ({first_line(exc)})") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise SourceError(f"{spec}: {module_name} has no callable {attr}")
    try:
        result = factory()
    except Exception as exc:  # noqa: BLE001 - whatever the user's factory raises, name it in one line
        raise SourceError(f"{spec}: calling {attr}() failed ({type(exc).__name__}: {first_line(exc)})") from None
    example_inputs = dynamic_shapes = None
    if isinstance(result, tuple):
        if not 2 <= len(result) <= 3:
            raise SourceError(f"{spec}: factory must return module, (module, example_inputs) or (module, inputs, dynamic_shapes)")
        module, example_inputs, *rest = result
        dynamic_shapes = rest[0] if rest else None
    else:
        module = result
    if not is_torch_module(module):
        raise SourceError(f"{spec}: factory returned {type(module).__name__}, expected torch.nn.Module")
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    elif example_inputs is not None and not isinstance(example_inputs, (tuple, dict)):
        example_inputs = (example_inputs,)
    return _from_any_module(module, example_inputs, dynamic_shapes)
