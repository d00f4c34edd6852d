"""LuffyOptimizer: compile an in-memory transformers model and generate with it like transformers.

    opt = LuffyOptimizer(model=hf_model, config=LuffyConfig(optimization_level="balanced")).optimize()
    ids = opt.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=20)
    opt.get_optimization_report()["parity"]
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from .compiler.config import LuffyConfig


class LuffyOptimizer:
    """Compiles ``model`` (a transformers causal LM or encoder) with ``config``; see :meth:`optimize`."""

    def __init__(self, model, config: LuffyConfig | None = None, output_dir: str | None = None):
        self.model = model
        self.config = config or LuffyConfig()
        self.output_dir = output_dir

    def optimize(self) -> "OptimizedModel":
        """Compile now (into ``output_dir``, or a temporary directory removed with the result)."""
        from .auto import compile as compile_artifact  # config.auto: the decider, as luffy.compile

        cleanup = None
        if self.output_dir is None:
            workdir = Path(tempfile.mkdtemp(prefix="luffy-"))
            output = workdir / "artifact"
            cleanup = workdir
        else:
            output = Path(self.output_dir)
        try:
            artifact = compile_artifact(self.model, output=output, config=self.config)
        except BaseException:
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
            raise
        return OptimizedModel(artifact.load(), artifact.manifest, cleanup)


class OptimizedModel:
    """The compiled model: ``generate`` takes tokenizer outputs and returns ids the way transformers does."""

    def __init__(self, engine, manifest: dict, cleanup: Path | None):
        self.engine = engine
        self.manifest = manifest
        if cleanup is not None:
            self._finalizer = weakref.finalize(self, shutil.rmtree, cleanup, True)

    @property
    def artifact_path(self) -> Path:
        return self.engine.path

    def get_optimization_report(self) -> dict:
        """The compile report (per-pass counts and timings, op histogram, parity) as a dict."""
        return dict(self.manifest["report"])

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens: int = 20, **kwargs):
        """transformers-style generate: rows are taken where ``attention_mask`` is 1 (left or right padding
        both work) and returned left-padded; a torch tensor in gives a torch tensor out."""
        if input_ids is None:
            raise TypeError("generate() needs input_ids")
        kwargs.pop("token_type_ids", None)
        is_torch = type(input_ids).__module__.startswith("torch")
        ids = np.asarray(input_ids.cpu().numpy() if is_torch else input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if attention_mask is not None:
            mask = np.asarray(attention_mask.cpu().numpy() if hasattr(attention_mask, "cpu") else attention_mask)
            rows = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask.reshape(ids.shape))]
        else:
            rows = ids.tolist()
        out = self.engine.generate(rows, max_new_tokens=max_new_tokens, **kwargs)
        if is_torch:
            import torch

            return torch.from_numpy(out)
        return out

    def __call__(self, *args, **kwargs):
        return self.generate(*args, **kwargs)
