"""The MatMulNBits tensors of one weight, computed when they are written, a slice of output features at a time.

quantize-weights decides what to quantize; this module makes the bytes. A `PackedWeight` stands for the codes,
scales and zero points of one [K, N] weight: onnx_ir lazy tensors that compute all three when the first is read
(the artifact's writer reads them one after the other) and drop them once each has been read. The weight is
read ``CHUNK_BYTES`` of output features at a time, so quantizing a 128k x 4k head holds a slice of it in fp32,
not the whole matrix: from a tensor that can read a column range itself (a checkpoint tensor, or its transpose:
`read_columns`), without ever materializing the matrix. Round-to-nearest codes come from ONNX Runtime's own
packer; GPTQ codes (when the compile collected a Hessian for the weight's input) from passes/gptq.py. Both
quantize each output feature on its own, so slicing over N gives the bytes the whole matrix would.

The codes' layout is also GatherBlockQuantized's (uint8 data, quantize axis 1, bits 4 or 8): the same rows read
as [N, K * bits / 8] are the quantized embedding table, which is how a tied embedding and head share one copy.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx_ir as ir

from . import gptq as gptq_math

CHUNK_BYTES = 64 << 20  # fp32 bytes of weight quantized at once


def column_reader(tensor) -> Callable[[], Callable[[int, int], np.ndarray]]:
    """``open()`` -> ``read(n0, n1)``, the fp32 [K, n1 - n0] slice of a [K, N] weight tensor. A tensor that can
    slice itself (``read_columns``) is read a slice at a time; any other is read whole once per ``open()``, and
    dropped with the ``read`` it returned."""
    own = getattr(tensor, "read_columns", None)
    if callable(own):
        return lambda: own
    return lambda: _sliced(lambda: np.asarray(tensor.numpy(), dtype=np.float32), lambda w, n0, n1: w[:, n0:n1])


def row_reader(table) -> Callable[[], Callable[[int, int], np.ndarray]]:
    """``open()`` -> ``read(n0, n1)``, columns n0:n1 of the transpose of an [N, K] table (an embedding read as a
    head): rows n0:n1 of the table, transposed."""
    own = getattr(table, "read_rows", None)
    if callable(own):
        return lambda: (lambda n0, n1: own(n0, n1).T)
    return lambda: _sliced(lambda: np.asarray(table.numpy(), dtype=np.float32), lambda t, n0, n1: t[n0:n1].T)


def _sliced(load: Callable[[], np.ndarray], cut: Callable) -> Callable[[int, int], np.ndarray]:
    cache: dict = {}

    def read(n0: int, n1: int) -> np.ndarray:
        if "array" not in cache:
            cache["array"] = load()
        return cut(cache["array"], n0, n1)

    return read


class PackedWeight:
    """Codes [N, K/block, block*bits/8], scales [N, K/block] and zero points (asymmetric) of a [K, N] weight."""

    def __init__(self, open_reader: Callable[[], Callable[[int, int], np.ndarray]], k: int, n: int, bits: int,
                 block: int, symmetric: bool, hessian=None, clip_search: bool = False):
        """``hessian``: GPTQ's X^T X of the weight's input (or its gptq.HessianFactor), an array or a callable that
        gives it when the codes are computed (a streamed compile collects each layer's only when its weights are written).
        ``clip_search``: without a Hessian, round-to-nearest with each block's range clipped (gptq.clipped_rtn)."""
        self.open_reader, self.k, self.n, self.bits, self.block = open_reader, k, n, bits, block
        self.symmetric, self.clip_search = symmetric, clip_search
        self.hessian = hessian if hessian is not None and k % block == 0 else None
        self.blocks = -(-k // block)
        self._parts: list | None = None
        self._unread: set = set()
        self._gather_zero_points = False  # a fourth part: the zero points as a tied GatherBlockQuantized reads them

    @property
    def method(self) -> str:
        if self.hessian is not None:
            return "gptq"
        return "rtn-clipped" if self.clip_search else "rtn"

    def shapes(self) -> list[tuple[ir.DataType, tuple[int, ...]]]:
        blob = self.block * self.bits // 8
        out = [(ir.DataType.UINT8, (self.n, self.blocks, blob)), (ir.DataType.FLOAT, (self.n, self.blocks))]
        if not self.symmetric:
            out.append((ir.DataType.UINT8, (self.n, -(-self.blocks * self.bits // 8))))
        return out

    def tensors(self, base: str, flat_codes: bool = False) -> list[ir.LazyTensor]:
        """The lazy tensors (codes, scales[, zero points]); ``flat_codes``: codes as GatherBlockQuantized's
        [N, K * bits / 8] table."""
        out = []
        for i, (dtype, shape) in enumerate(self.shapes()):
            if i == 0 and flat_codes:
                shape = (self.n, self.blocks * shape[2])
            name = f"{base}{('_q%d' % self.bits, '_scales', '_zero_points')[i]}"
            out.append(ir.LazyTensor(lambda i=i, shape=shape, name=name: self._part(i, shape, name), dtype=dtype,
                                     shape=ir.Shape(list(shape)), name=name))
        return out

    def gather_zero_points(self, base: str) -> ir.LazyTensor:
        """The zero points as GatherBlockQuantized reads them beside the [N, K/block, blob] codes (quantize axis 2):
        [N, K/block, 1], one per byte. MatMulNBits packs two int4 zero points a byte along K/block, which that
        layout cannot express; this copy is N * K/block bytes (2 MB for a 128k x 2k head at block 128)."""
        if self.symmetric:
            raise ValueError(f"{base}: symmetric codes have no zero points")
        self._gather_zero_points = True
        name = f"{base}_gather_zero_points"
        shape = (self.n, self.blocks, 1)
        return ir.LazyTensor(lambda: self._part(3, shape, name), dtype=ir.DataType.UINT8, shape=ir.Shape(list(shape)),
                             name=name)

    def _part(self, index: int, shape: tuple[int, ...], name: str) -> ir.Tensor:
        if self._parts is None:
            self._parts = self._compute()
            if self._gather_zero_points:
                self._parts.append(_one_zero_point_a_byte(self._parts[2], self.bits, self.blocks))
            self._unread = set(range(len(self._parts)))
        array = self._parts[index].reshape(shape)
        self._unread.discard(index)
        if not self._unread:  # every part written: drop the arrays (a second read computes them again)
            self._parts = None
        return ir.tensor(array, name=name)

    def _compute(self) -> list[np.ndarray]:
        rows = max(1, CHUNK_BYTES // (4 * self.k))
        read = self.open_reader()  # whatever it holds goes when this computation ends
        hessian = self.hessian() if callable(self.hessian) else self.hessian
        if hessian is not None and not isinstance(hessian, gptq_math.HessianFactor):
            hessian = gptq_math.hessian_factor(hessian)  # once for every row chunk (a 128k-row head has 16)
        # a [K, n] slice, often the transposed view of a checkpoint's [n, K] rows: the clip search and GPTQ work
        # on rows of [N, K] and transpose it back for free; only ORT's packer needs it contiguous as [K, n]
        pieces = [self._quantize(np.asarray(read(n0, min(n0 + rows, self.n)), dtype=np.float32), hessian)
                  for n0 in range(0, self.n, rows)]
        return [np.ascontiguousarray(np.concatenate(parts, axis=0)) for parts in zip(*pieces)]

    def _quantize(self, w: np.ndarray, hessian: gptq_math.HessianFactor | None) -> tuple[np.ndarray, ...]:
        n = w.shape[1]
        if hessian is not None or self.clip_search:
            codes, scales, zeros = (gptq_math.gptq(w, hessian, self.bits, self.block, self.symmetric)
                                    if hessian is not None else
                                    gptq_math.clipped_rtn(w, self.bits, self.block, self.symmetric))
            packed, scales, zero_points = gptq_math.pack_matmul_nbits(codes, scales, zeros, self.bits, self.block,
                                                                      self.symmetric)
        else:
            packed, scales, zero_points = ort_rtn(np.ascontiguousarray(w), self.bits, self.block, self.symmetric)
        out = (packed, scales.reshape(n, -1).astype(np.float32))
        return out if self.symmetric else (*out, zero_points.reshape(n, -1))


def _one_zero_point_a_byte(packed: np.ndarray, bits: int, blocks: int) -> np.ndarray:
    """MatMulNBits' zero points [N, ceil(blocks * bits / 8)] (int4: two a byte, low nibble first) -> [N, blocks]."""
    if bits == 8:
        return np.ascontiguousarray(packed[:, :blocks])
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return np.ascontiguousarray(nibbles[:, :blocks])


def ort_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """ONNX Runtime's round-to-nearest packer on a contiguous fp32 [K, N] weight: (codes, scales, zero points)."""
    nbits = ort_nbits()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    packed, scales, zero_points = nbits.DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
    return packed, scales, None if symmetric else zero_points


def ort_nbits():
    """onnxruntime's matmul_nbits_quantizer module, imported without its side effect.

    Importing it calls logging.basicConfig(level=INFO) on the root logger, which would turn on INFO
    logging for the whole process of whoever called luffy.compile. The root logger is put back as it was.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
    return matmul_nbits_quantizer
