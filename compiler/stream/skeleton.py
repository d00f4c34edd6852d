"""Models without weights: what the streamed capture learns from the model's code before reading a tensor.

Built with zero-byte parameters (created on the meta device, then replaced by a zero-stride view of one
scalar, which torch.export can trace and a forward pass can run), while buffers are real: a rotary
``inv_freq`` is computed by the module's own __init__ and is no checkpoint tensor. The full-depth skeleton
gives the parameter names, shapes and ties the checkpoint is checked against, the KV-cache layout, and the
kind of every decoder layer; the template is the same model cut to the few layers the export needs.

Layer kinds. Layers whose modules have the same types, parameter shapes and settings (everything but their
index: Gemma 2's ``sliding_window`` on every other layer, a dense MLP among mixture-of-experts layers) are one
kind. The template is the shortest prefix of the model in which every (kind of layer j-1, kind of layer j) pair
of the model occurs, ending on the kind of the model's last layer; stamp.py copies, for each later layer, the
template layer with the same pair. Uniform models need two layers: the first (it reads the embedding) and one
that reads its predecessor.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from ...errors import SourceError, UnsupportedModelError, first_line

MAX_TEMPLATE_LAYERS = 8  # a longer period than this is no pattern worth stamping: the whole-model path takes it
# Module attributes that number a layer rather than describe it.
INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx")


def load_config(path: Path):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{path}/config.json: transformers cannot read this config ({first_line(exc)})") from None
    except OSError as exc:
        raise SourceError(f"{path}/config.json: {first_line(exc)}") from None


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter created inside is moved to the meta device as it is registered, before its module's
    initializer writes random values into it: a model of any size is built in no memory and no time."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(config):
    """The causal LM ``config`` describes, in fp32, its parameters zero-stride views of one zero (tied ones
    stay tied), its buffers real."""
    import torch
    import transformers

    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    empty: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in empty:
                data = torch.zeros((), dtype=param.dtype).expand(param.shape)
                empty[id(param)] = torch.nn.Parameter(data, requires_grad=False)
            module._parameters[name] = empty[id(param)]
    return model.eval()


def decoder_layers(model) -> tuple[str, object]:
    """(module path, ModuleList) of the decoder layers: the list as long as the config's depth that holds the most
    parameters."""
    import torch

    depth = model.config.num_hidden_layers
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == depth and depth > 0]
    if not lists:
        raise UnsupportedModelError(f"{type(model).__name__}: no list of {depth} decoder layers found")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def layer_kinds(model, layers) -> list[str]:
    """One label per decoder layer; layers with the same label have the same modules, shapes and settings."""
    types = getattr(model.config, "layer_types", None)
    signatures: list = []
    kinds = []
    for index, layer in enumerate(layers):
        signature = (types[index] if isinstance(types, (list, tuple)) and len(types) == len(layers) else None,
                     _signature(layer))
        if signature not in signatures:
            signatures.append(signature)
        kinds.append(f"k{signatures.index(signature)}")
    return kinds


def _signature(layer) -> tuple:
    parts = []
    for name, module in layer.named_modules():
        settings = tuple(sorted(
            (key, value) for key, value in vars(module).items()
            if not key.startswith("_") and key not in INDEX_ATTRIBUTES
            and isinstance(value, (int, float, str, bool, type(None)))))
        params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters(recurse=False))
        parts.append((name, type(module).__name__, settings, params))
    return tuple(parts)


def template_depth(kinds: list[str]) -> int | None:
    """Layers the template needs (see the module docstring), or None when no prefix of at most
    MAX_TEMPLATE_LAYERS has every pair.

    >>> template_depth(["a"] * 32), template_depth(["a", "b"] * 8), template_depth(["a", "b"] * 8 + ["a"])
    (2, 4, 3)
    """
    n = len(kinds)
    needed = {(kinds[j - 1], kinds[j]) for j in range(1, n)}
    for depth in range(min(2, n), min(n, MAX_TEMPLATE_LAYERS) + 1):
        present = {(kinds[s - 1], kinds[s]) for s in range(1, depth)}
        if needed <= present and kinds[depth - 1] == kinds[-1]:
            return depth
    return None


def reduced_config(config, depth: int):
    """``config`` cut to its first ``depth`` layers (per-layer lists such as ``layer_types`` cut with it)."""
    reduced = copy.deepcopy(config)
    full = config.num_hidden_layers
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == full and not key.startswith("_"):
            setattr(reduced, key, type(value)(value[:depth]))
    reduced.num_hidden_layers = depth
    return reduced


def parameter_table(model) -> tuple[dict, dict]:
    """(name -> (shape, is_float), name -> other names of the same tied parameter), one entry per parameter."""
    names: dict[int, list[str]] = {}
    params = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[name] = (tuple(param.shape), param.is_floating_point())
    aliases = {name: [n for n in group if n != name] for group in names.values() for name in group}
    return params, aliases


def ignorable_keys(model) -> list[str]:
    """The model's own patterns for checkpoint keys transformers' loader drops without a word."""
    patterns = []
    for attribute in ("_keys_to_ignore_on_load_unexpected", "_keys_to_ignore_on_load_missing"):
        patterns += list(getattr(model, attribute, None) or [])
    return patterns


def model_names(model, checkpoint_keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """(model name -> checkpoint key, checkpoint keys transformers converts on load), renamed the way transformers'
    loader renames them (its per-architecture renamings, e.g. GPT-NeoX's ``embed_out`` -> ``lm_head``, and the
    base-model prefix a checkpoint may lack). Keys that a WeightConverter turns into other tensors (Mixtral's
    per-expert matrices stacked into one) are listed apart: the streamed path does not replay those."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    names, converted = {}, []
    for key in checkpoint_keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if renamed not in state and key in state:
            renamed, pattern = rename_source_key(key, [], [], prefix, state)
        if pattern is not None:
            converted.append(key)
        else:
            names[renamed] = key
    return names, converted
