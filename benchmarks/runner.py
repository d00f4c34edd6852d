"""The interface every system `luffy bench` times implements, and the weight accounting they share.

A runner lives in its own worker process (see worker.py):

    build()      one-shot, in a throwaway worker: compile / export / convert; timed
    load()       in the measuring worker: open the model, report its weight bytes
    generate()   one timed run; calls ``first_token()`` the moment the first new token exists
    timed_run()  instead of generate, for a system that times itself (a binary, a Python of its own)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx


def onnx_weight_bytes(model_path: Path) -> dict:
    """Bytes of every initializer of an ONNX graph, and of those a decode step actually streams.

    Tables read only through ``Gather`` (embedding lookups) are excluded from the streamed bytes: a step
    reads one row per token from them, not the whole table. External data is not loaded.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        count = int(np.prod(init.dims)) if init.dims else 1
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(init.data_type, itemsize * 8)
        sizes[init.name] = (count * bits + 7) // 8
    gather_only = set(sizes)
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name in gather_only and not (node.op_type.startswith("Gather") and position == 0):
                gather_only.discard(name)
    total = sum(sizes.values())
    return {"weight_bytes": total, "streamed_weight_bytes": total - sum(sizes[n] for n in gather_only)}


class Runner:
    """One system. ``paths`` holds hf_dir, artifact, build_dir (and compile settings for luffy; ``peer_path`` where
    ``--peer NAME=PATH`` said the system is)."""

    name = ""
    label = ""
    needs_hf_dir = True
    max_batch: int | None = None  # the largest batch it can run (None: any); larger ones are left out, said why

    def __init__(self, paths: dict):
        self.paths = paths

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this system cannot run here (a missing package), or None."""
        return None

    @classmethod
    def unavailable_with(cls, paths: dict) -> str | None:
        """``unavailable``, for systems whose presence depends on where ``paths`` says they are."""
        return cls.unavailable()

    def build(self) -> dict:
        return {}

    def load(self) -> dict:
        raise NotImplementedError

    def generate(self, ids: np.ndarray, new_tokens: int, first_token: Callable[[], None]) -> list[int]:
        """Greedy-generate ``new_tokens`` for every row of ``ids``; return row 0's new tokens."""
        raise NotImplementedError
