"""The PyTorch side of a streamed compile's checks: the model's own forward, weights loaded module by module.

The skeleton (zero-byte parameters) runs its ordinary forward; a pre-hook on every module that owns parameters
reads them from the checkpoint (fp32) just before the module runs, and a hook puts the zero-byte views back
after. So the reference is transformers' own code, family by family, holding one module's weights at a time: a
projection, a norm, at most the embedding table. A model that reads a parameter outside its module's forward
would compute with zeros there and fail the comparison loudly, never pass it silently.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def weights_on_demand(model, checkpoint, keys: dict[str, str]):
    """Within the block, ``model``'s modules read their parameters from ``checkpoint`` (``keys``: parameter name ->
    checkpoint key) when they run, and drop them after."""
    import torch

    handles = []
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        names = {name: f"{module_name}.{name}" if module_name else name for name in own}

        def load(mod, args, names=names):
            for name, full in names.items():
                array = checkpoint.read(keys[full])
                mod._parameters[name] = torch.nn.Parameter(torch.from_numpy(array), requires_grad=False)

        def drop(mod, args, output, empty=own):
            for name, param in empty.items():
                mod._parameters[name] = param

        handles += [module.register_forward_pre_hook(load), module.register_forward_hook(drop)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
