"""--dump-ir DIR: the graph after every pass as DIR/NN-<pass>.onnx (00-captured.onnx first).

Weights go to ONE shared file, DIR/weights.data, each distinct tensor written once: passes rarely touch
weights, so ten dumps of a model cost about one copy of its weights, not ten. Every dump is a complete,
valid ONNX model (external data, relative location), so it opens in Netron, loads with onnx.load and runs
on ORT. Tensors under 1 KiB (onnx's own default threshold) stay inline.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import onnx
import onnx_ir as ir

WEIGHTS_FILE = "weights.data"
INLINE_BYTES = 1024
_DUMP_NAME = re.compile(r"^\d{2,}-.+\.onnx$")


class IRDumper:
    """Writes numbered dumps; call it as run_passes' ``after_pass`` hook after dumping the captured graph."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # A previous run's dumps would interleave with this one's (and its weights.data is append-only);
        # remove only files this class writes.
        for old in self.directory.iterdir():
            if old.is_file() and (old.name == WEIGHTS_FILE or _DUMP_NAME.match(old.name)):
                old.unlink()
        self.weights = self.directory / WEIGHTS_FILE
        self.weights.touch()
        self.written: dict[bytes, tuple[int, int]] = {}  # content digest -> (offset, length) in weights.data
        self.count = 0

    def dump(self, name: str, model: ir.Model) -> Path:
        proto = ir.serde.serialize_model(model)
        with open(self.weights, "ab") as data:
            for tensor in proto.graph.initializer:
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_BYTES:
                    self._externalize(tensor, data)
        path = self.directory / f"{self.count:02d}-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.onnx"
        onnx.save_model(proto, path)
        self.count += 1
        return path

    def __call__(self, pass_name: str, model: ir.Model) -> dict:
        return {"ir_dump": self.dump(pass_name, model).name}

    def _externalize(self, tensor: onnx.TensorProto, data) -> None:
        digest = hashlib.blake2b(tensor.raw_data, digest_size=20).digest()
        if digest not in self.written:
            self.written[digest] = (data.tell(), len(tensor.raw_data))
            data.write(tensor.raw_data)
        offset, length = self.written[digest]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))
