"""The compile targets: what each runtime needs around the shared capture → passes → emit flow.

A target owns four things, so `compile()` holds no per-target branch:
  capture_opset   the ONNX opset the graph is exported at (its runtime's parser sets the ceiling)
  extra_steps     passes between the opt-level pipeline and the precision passes (TensorRT's plugins)
  check           the legality check before anything is written (the runtime's own op/opset rules)
  finish          what turns the staged directory into this target's artifact (TensorRT: profiles, build)

>>> target_for(LuffyConfig()).name
'ort'
"""

from __future__ import annotations

from ...errors import UsageError
from ..config import LuffyConfig
from .ort import OrtTarget
from .trt import TrtTarget

TARGETS = {"ort": OrtTarget, "trt": TrtTarget}


def target_for(cfg: LuffyConfig) -> OrtTarget | TrtTarget:
    """The target object for ``cfg.target``; TensorRT's version and builder are resolved (and refused) here."""
    if cfg.target not in TARGETS:
        raise UsageError(f"unknown target {cfg.target!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[cfg.target](cfg)
