"""A safetensors checkpoint read one tensor at a time: its index, its checks, and lazy tensors over it.

`Checkpoint(directory)` reads every shard's header with safetensors' own `safe_open` (which refuses a truncated
or corrupt file) and the index JSON when there is one, so a missing shard, a truncated file or a key in two
shards fails before any work, naming the file. `check_parameters` then holds the checkpoint against the
model's parameters (names, shapes, dtypes) the way transformers' loader would, without loading anything.

`CheckpointTensor` is an onnx_ir lazy tensor over one entry: its values are read when the artifact is written
(or when a pass needs them), converted to the graph's dtype, and dropped. Each read opens the shard, copies the
one tensor out and closes it again: a shard kept open for the whole compile would leave every page read so far
mapped, and mapped pages count in the process's resident set (a 16 GB checkpoint would show as 16 GB of RSS).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from safetensors import SafetensorError, safe_open

from ...errors import SourceError, first_line

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names -> (itemsize, whether a float). transformers loads every float tensor as the model's
# dtype (fp32 here), so a float of any width is accepted where the model has a float parameter.
DTYPES = {"F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True), "F8_E4M3": (1, True),
          "F8_E5M2": (1, True), "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
          "U8": (1, False), "BOOL": (1, False)}
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
SAMPLE_ROWS = 2  # rows read from each end of a tensor for its fingerprint


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: where it is and what it holds."""

    file: Path
    key: str
    dtype: str  # safetensors' name: BF16, F32, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES.get(self.dtype, (1, False))[0]


class Checkpoint:
    """The ``*.safetensors`` files of a Hugging Face model directory, indexed by tensor name.

    >>> ckpt = Checkpoint(Path("models/llama-3.2-1b"))           # doctest: +SKIP
    >>> ckpt.entries["model.norm.weight"].shape, ckpt.nbytes       # doctest: +SKIP
    ((2048,), 2471645608)
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.directory}: no *.safetensors weights found")
        self.entries: dict[str, Entry] = {}
        for file in files:
            for entry in _read_header(file):
                if entry.key in self.entries:
                    raise SourceError(f"{file}: tensor {entry.key} is also in {self.entries[entry.key].file.name}; "
                                      "a checkpoint holds each tensor once")
                self.entries[entry.key] = entry
        self._check_index(files)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _check_index(self, files: list[Path]) -> None:
        index = self.directory / INDEX_FILE
        if not index.is_file():
            return
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{index}: not a safetensors index ({first_line(exc)})") from None
        present = {f.name for f in files}
        for key, name in weight_map.items():
            if name not in present:
                raise SourceError(f"{self.directory / name}: shard listed in {INDEX_FILE} (tensor {key}) is missing")
            entry = self.entries.get(key)
            if entry is None or entry.file.name != name:
                raise SourceError(f"{self.directory / name}: {INDEX_FILE} places tensor {key} here, but the shard "
                                  "does not hold it")

    def read(self, key: str, rows: slice | None = None, columns: slice | None = None) -> np.ndarray:
        """The tensor's values (or a block of rows/columns of a 2-D one) as fp32 (floats; other dtypes as they
        are), read and converted on the way."""
        import torch

        entry = self.entries[key]
        with safe_open(entry.file, framework="pt") as handle:
            if rows is None and columns is None:
                tensor = handle.get_tensor(key)
            else:
                tensor = handle.get_slice(key)[rows or slice(None), columns or slice(None)]
        return (tensor.to(torch.float32) if tensor.is_floating_point() else tensor).numpy()

    def fingerprint(self, key: str) -> str:
        """A digest of the first and last rows: different tensors (of one shape) differ there in practice; callers
        that need certainty compare full values when fingerprints collide."""
        import torch

        entry = self.entries[key]
        with safe_open(entry.file, framework="pt") as handle:
            sliced = handle.get_slice(key)
            rows = entry.shape[0] if entry.shape else 0
            if rows <= 2 * SAMPLE_ROWS:
                parts = [handle.get_tensor(key)]
            else:
                parts = [sliced[:SAMPLE_ROWS], sliced[rows - SAMPLE_ROWS:]]
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            digest.update(part.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return f"{entry.dtype}{entry.shape}:{digest.hexdigest()}"

    def tensor(self, key: str, name: str | None = None) -> "CheckpointTensor":
        return CheckpointTensor(self, key, name=name)


def _read_header(file: Path) -> list[Entry]:
    try:
        with safe_open(file, framework="pt") as handle:
            entries = []
            for key in handle.keys():
                sliced = handle.get_slice(key)
                entries.append(Entry(file, key, sliced.get_dtype(), tuple(int(d) for d in sliced.get_shape())))
    except (SafetensorError, OSError) as exc:
        raise SourceError(f"{file}: cannot read this safetensors file ({first_line(exc)}); truncated or corrupt") from None
    for entry in entries:
        if entry.dtype not in DTYPES:
            raise SourceError(f"{file}: tensor {entry.key} has dtype {entry.dtype}, which luffy cannot read")
    return entries


def check_parameters(checkpoint: Checkpoint, parameters: dict[str, tuple[tuple[int, ...], bool]],
                     aliases: dict[str, list[str]], names: dict[str, str], ignorable: list[str]) -> dict[str, str]:
    """Map every model parameter to its checkpoint key, or fail naming the first tensor at fault.

    ``parameters``: name -> (shape, is_float); ``aliases``: name -> the other names of a tied parameter (the
    checkpoint may store a tied weight under any of them); ``names``: model name -> checkpoint key as the loader
    renames keys; ``ignorable``: the model's patterns for checkpoint keys transformers ignores. A missing tensor, a
    shape or dtype the parameter cannot take, or a checkpoint tensor the model has no place for is refused, as
    transformers' loader refuses it in the whole-model path.
    """
    keys: dict[str, str] = {}
    found = {name: next((names[c] for c in [name, *aliases.get(name, [])] if c in names), None) for name in parameters}
    missing = sorted(name for name, key in found.items() if key is None)
    if missing:  # worded as the whole-model path's check (sources/torch_model.require_complete_weights)
        raise SourceError(f"{checkpoint.directory}: checkpoint tensors missing: {_listed(missing)}; the weights do "
                          "not match config.json")
    for name, (shape, is_float) in parameters.items():
        key = found[name]
        entry = checkpoint.entries[key]
        if tuple(entry.shape) != tuple(shape):
            raise SourceError(f"{entry.file}: tensor {key} has shape {list(entry.shape)}, the model expects "
                              f"{list(shape)} (config.json and the weights disagree)")
        if DTYPES[entry.dtype][1] != is_float:
            raise SourceError(f"{entry.file}: tensor {key} has dtype {entry.dtype}, the model expects a "
                              f"{'float' if is_float else 'integer'} tensor")
        keys[name] = key
    used = set(keys.values())
    patterns = [re.compile(p) for p in ignorable]
    extra = [k for k in checkpoint.entries if k not in used and not any(p.search(k) for p in patterns)]
    if extra:
        raise SourceError(f"{checkpoint.entries[extra[0]].file}: checkpoint tensors not in the model: "
                          f"{_listed(sorted(extra))}; the weights do not match config.json")
    return keys


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


class CheckpointTensor(ir.LazyTensor):
    """One checkpoint tensor as an onnx_ir tensor: fp32 (for floats), read when its values are needed."""

    def __init__(self, checkpoint: Checkpoint, key: str, name: str | None = None):
        entry = checkpoint.entries[key]
        is_float = DTYPES[entry.dtype][1]
        dtype = ir.DataType.FLOAT if is_float else ir.DataType.from_numpy(np.dtype(_TORCH_DTYPES[entry.dtype]))
        super().__init__(self._load, dtype=dtype, shape=ir.Shape(entry.shape), name=name)
        self.checkpoint, self.key = checkpoint, key

    def _load(self) -> ir.Tensor:
        return ir.tensor(self.checkpoint.read(self.key), name=self.name)

    def fingerprint(self) -> str:
        return "checkpoint:" + self.checkpoint.fingerprint(self.key)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of a 2-D tensor (quantization reads a large weight a slice at a time)."""
        return self.checkpoint.read(self.key, rows=slice(start, stop))

    def read_columns(self, start: int, stop: int) -> np.ndarray:
        return self.checkpoint.read(self.key, columns=slice(start, stop))

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.key,)
