"""Blockwise weight quantization arithmetic for MatMulNBits: the GPTQ solver and the packing it needs.

ONNX Runtime's own GPTQ path (GPTQWeightOnlyQuantConfig) runs through Intel Neural Compressor, a heavy
extra dependency that also wants the whole model and a data reader. GPTQ itself is forty lines of linear
algebra on one weight and the Hessian of its input, so luffy carries it: the compiler collects the
Hessians once on the optimized graph, and this module turns (weight, Hessian) into MatMulNBits tensors.

Grid: the one ORT's round-to-nearest quantizer uses (asymmetric: the block's [min(w, 0), max(w, 0)]
mapped onto [0, 2^bits - 1] with an integer zero point; symmetric: absmax onto [-2^(bits-1), 2^(bits-1)-1]
stored with the implicit zero point 2^(bits-1)), so the two methods differ only in how codes are chosen.

Layout (com.microsoft MatMulNBits, weight B of a [K, N] MatMul): codes [N, K/block, block*bits/8] with
two 4-bit codes per byte, low nibble first; scales [N, K/block]; zero points [N, ceil(K/block*bits/8)]
packed the same way.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..runtimes.cpu_features import usable_cores

GPTQ_DAMP = 0.01  # fraction of the mean Hessian diagonal added for numerical stability (the paper's value)
GPTQ_COLUMNS = 128  # lazy-batch width of the column updates; a multiple of every supported block size


def block_grid(w_block: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per row of ``w_block`` [rows, block]; dequantized = scale * (code - zero)."""
    maxq = (1 << bits) - 1
    if symmetric:
        lo, hi = w_block.min(axis=1), w_block.max(axis=1)
        absmax = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scale = absmax / -float(1 << (bits - 1))
        zero = np.full(scale.shape, 1 << (bits - 1), dtype=np.float64)
    else:
        lo, hi = np.minimum(w_block.min(axis=1), 0), np.maximum(w_block.max(axis=1), 0)
        scale = (hi - lo) / maxq
        zero = np.where(scale == 0, 1 << (bits - 1), np.round(-lo / np.where(scale == 0, 1, scale)))
        zero = np.clip(zero, 0, maxq)
    return scale, zero


def quantize_column(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    safe = np.where(scale == 0, 1, scale)
    return np.where(scale == 0, zero, np.clip(np.round(w / safe) + zero, 0, (1 << bits) - 1))


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one input's Hessian, computed once and shared by every weight reading that input (Q, K
    and V; gate and up): the features never active in calibration, and U, the upper triangular factor of the damped
    inverse Hessian ((H + damp I)^-1 = U^T U, row i holding the update weights for column i's error)."""

    dead: np.ndarray  # [K] bool
    upper: np.ndarray  # [K, K] float64 (a reversed view of a Fortran-ordered L^-1: no contiguous copy is made)


def hessian_factor(hessian: np.ndarray) -> HessianFactor:
    """The damped Hessian's `HessianFactor` (the reference code's cholesky(inv(H)).T)."""
    dead = np.diag(hessian) == 0  # features never active in calibration: their weights cannot matter to it
    # reversed, in float64, in one copy (see _upper_factor_of_inverse); the damping and the dead features' unit
    # diagonal are then added to it
    reversed_h = np.array(hessian[::-1, ::-1], dtype=np.float64, order="C")
    diagonal = np.diag_indices(len(reversed_h))
    reversed_h[diagonal] += np.where(dead[::-1], 1.0, 0.0)
    reversed_h[diagonal] += GPTQ_DAMP * np.mean(np.diag(reversed_h))
    return HessianFactor(dead, _upper_factor_of_inverse(reversed_h))


def _upper_factor_of_inverse(reversed_h: np.ndarray) -> np.ndarray:
    # Without inverting H: with P the reversal permutation and L = cholesky(P H P), H = V V^T for the upper
    # triangular V = P L P, so H^-1 = V^-T V^-1 and U = V^-1 = P L^-1 P (the Cholesky factor is unique, so this is
    # the reference's U). A Cholesky and a triangular inverse are (2/3) K^3 flops against inv's 2 K^3 and a second
    # Cholesky: K = 8192 (a 1B down projection) on 2 cores 24.1 -> 9.4 s. numpy has no triangular inverse: scipy's
    # LAPACK wrappers (dpotrf, dtrtri) do it, in place (the transpose of the symmetric C-ordered matrix is the same
    # matrix in LAPACK's Fortran order), and U is returned as a reversed view of L^-1: the only copy is the caller's
    # reversed one (gptq's slices of U are copied to contiguous blocks by matmul as they are used).
    from scipy.linalg import lapack

    lower, info = lapack.dpotrf(reversed_h.T, lower=1, clean=1, overwrite_a=1)
    if info == 0:
        lower, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise ValueError(f"GPTQ: the damped Hessian ({len(lower)} x {len(lower)}) is not positive definite "
                         f"(LAPACK info {info})")
    return lower[::-1, ::-1]


class SharedFactors:
    """{input name: Hessian} -> ``get(name)``, a callable giving that input's `HessianFactor`: computed once for the
    weights that read the input (Q, K and V; gate and up) and kept in the Hessian's place (the same size)."""

    def __init__(self, hessians: dict[str, np.ndarray]):
        self._held: dict[str, np.ndarray | HessianFactor] = dict(hessians)

    def __bool__(self) -> bool:
        return bool(self._held)

    def get(self, name: str):
        return (lambda: self.factor(name)) if name in self._held else None

    def factor(self, name: str) -> HessianFactor:
        held = self._held[name]
        if not isinstance(held, HessianFactor):
            held = self._held[name] = hessian_factor(held)
        return held


GPTQ_SUB_COLUMNS = 16  # inside a lazy batch, rank-1 updates stay within 16 columns (a cache-resident slab); divides every block size


def gptq(weight_kn: np.ndarray, hessian, bits: int, block_size: int, symmetric: bool):
    """GPTQ (Frantar et al. 2022) for a [K, N] MatMul weight and the K x K Hessian of its input (X^T X), or that
    Hessian's `hessian_factor` when several weights share it.

    Columns of the weight (input features) are quantized one at a time, and each one's rounding error is
    spread over the columns not yet quantized, weighted by the inverse Hessian, so the layer's output on
    the calibration activations moves as little as possible. Returns (codes [N, K], scales [N, K/block],
    zeros [N, K/block]) on the grid of `block_grid`, with each block's grid taken when its first column is
    reached (the "static groups" of the reference code, so scales come from the updated weights).

    Example::

        factor = hessian_factor(x.T @ x / len(x))  # x: [tokens, K] calibration inputs
        codes, scales, zeros = gptq(w, factor, bits=4, block_size=32, symmetric=False)
    """
    k, n = weight_kn.shape
    if k % block_size or GPTQ_COLUMNS % block_size or block_size % GPTQ_SUB_COLUMNS:
        raise ValueError(f"GPTQ needs K ({k}) divisible by the block size ({block_size})")
    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian)
    w = weight_kn.astype(np.float64)  # [K, N]: a column of the reference's [N, K] is a contiguous row here
    w[factor.dead] = 0.0
    codes = np.zeros((k, n), dtype=np.uint8)
    scales = np.zeros((k // block_size, n))
    zeros = np.zeros((k // block_size, n))
    for i1 in range(0, k, GPTQ_COLUMNS):
        i2 = min(i1 + GPTQ_COLUMNS, k)
        err = _quantize_batch(w[i1:i2], factor.upper[i1:i2, i1:i2], i1, codes, scales, zeros, bits, block_size,
                              symmetric)
        w[i2:] -= factor.upper[i1:i2, i2:].T @ err
    return np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T)


def _quantize_batch(batch, hinv, first, codes, scales, zeros, bits, block_size, symmetric) -> np.ndarray:
    """Quantize one lazy batch of input features (rows of the [K, N] weight, updated in place) into codes, scales
    and zeros ([K or K/block, N], rows from ``first``); returns the batch's scaled errors [columns, N] for the update of the later columns.
    Errors propagate by rank-1 updates inside a slab of GPTQ_SUB_COLUMNS columns and by one matrix product to the
    rest of the batch after each slab: the same arithmetic as updating the whole batch per column, but the
    per-column work touches 16 columns (N=8192: 1 MB) instead of up to 128 (8 MB, out of cache)."""
    err = np.zeros_like(batch)
    width = len(batch)
    for j1 in range(0, width, GPTQ_SUB_COLUMNS):
        j2 = j1 + GPTQ_SUB_COLUMNS
        for i in range(j1, j2):
            col, b = first + i, (first + i) // block_size
            if col % block_size == 0:  # the block's grid, from its columns as updated so far
                scales[b], zeros[b] = block_grid(batch[i:i + block_size].T, bits, symmetric)
            q = quantize_column(batch[i], scales[b], zeros[b], bits)
            codes[col] = q
            err[i] = (batch[i] - scales[b] * (q - zeros[b])) / hinv[i, i]
            batch[i + 1:j2] -= np.outer(hinv[i, i + 1:j2], err[i])
        batch[j2:] -= hinv[j1:j2, j2:].T @ err[j1:j2]
    return err


def rtn(weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Round-to-nearest on the same grid as `gptq` (for tests and error comparisons): codes, scales, zeros."""
    k, n = weight_kn.shape
    w = weight_kn.T.astype(np.float64)
    blocks = -(-k // block_size)
    w = np.pad(w, ((0, 0), (0, blocks * block_size - k)))
    codes = np.zeros(w.shape, dtype=np.uint8)
    scales, zeros = np.zeros((n, blocks)), np.zeros((n, blocks))
    for b in range(blocks):
        cols = slice(b * block_size, (b + 1) * block_size)
        scales[:, b], zeros[:, b] = block_grid(w[:, cols], bits, symmetric)
        codes[:, cols] = quantize_column(w[:, cols], scales[:, b, None], zeros[:, b, None], bits)
    return codes[:, :k], scales, zeros


# the range shrinks `clipped_rtn` tries per block (llama-pydoc int4 block 128: +0.45 % perplexity with these,
# +0.48 % with 17 from 0.6, +0.63 % unclipped)
CLIP_RATIOS = np.linspace(0.7, 1.0, 16)


def clipped_rtn(weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Round-to-nearest with each block's range clipped to whichever of CLIP_RATIOS x [min, max] (symmetric:
    x absmax) gives the least squared error: codes, scales, zeros on `block_grid`'s kind of grid.

    Why luffy's own and not ORT's packer (which maps the block's full [min, max]): one outlier stretches a
    block's 16 levels over all its weights, and at block 128 that cost +0.63 % perplexity on llama-pydoc
    (int4, RTN) against +0.45 % at block 32. Clipped, block 128 measured +0.45 %: block 32's quality at
    block 128's bytes (0.535 per weight against 0.641) and decode speed. (llama.cpp's k-quants search their
    scales the same way.) Rows go in chunks that stay in cache: the search reads each weight once per ratio.
    """
    k, n = weight_kn.shape
    blocks = -(-k // block_size)
    if k % block_size == 0:  # no padding: the [N, K] rows as they are (no copy when they were transposed to [K, N])
        w = np.ascontiguousarray(weight_kn.T, dtype=np.float32)
    else:
        w = np.zeros((n, blocks * block_size), dtype=np.float32)
        w[:, :k] = weight_kn.T
    w = w.reshape(n, blocks, block_size)
    codes = np.empty((n, blocks * block_size), dtype=np.uint8)
    scales, zeros = np.empty((n, blocks), np.float32), np.empty((n, blocks), np.float32)
    rows = max(1, (1 << 18) // (blocks * block_size))  # ~1 MiB of float32 per chunk

    def search(r: int) -> None:
        chunk = slice(r, r + rows)
        codes[chunk], scales[chunk], zeros[chunk] = _clipped_chunk(w[chunk], bits, symmetric)

    # chunks are independent and numpy lets go of the GIL inside each ufunc: one thread per core (1.7x on 2 cores
    # for a 2048 x 8192 weight), the same codes as one thread
    with ThreadPoolExecutor(max_workers=min(usable_cores(), -(-n // rows))) as pool:
        list(pool.map(search, range(0, n, rows)))
    return codes[:, :k], scales.astype(np.float64), zeros.astype(np.float64)


def _clipped_chunk(w: np.ndarray, bits: int, symmetric: bool):
    # A candidate's scale is `ratio` x the block's full-range scale `unit`, and its zero point does not depend on
    # the ratio (-lo * ratio / (unit * ratio)), so the weights are divided by `unit` once and each candidate costs
    # a scalar multiply, a round, the clip to the block's code range and two dot products per block: its squared
    # error in units of unit^2 is |ratio*q - u|^2 = ratio^2 q.q - 2 ratio q.u + u.u (u.u the same for every
    # candidate). Per-block operands broadcast along the block cost numpy 2-8x a contiguous pass (np.clip with
    # array bounds the most), so the bounds are spelt out once per chunk. A 2048 x 8192 weight on a 2-core EPYC:
    # 0.35 -> 0.27 s asymmetric, 0.56 -> 0.31 s symmetric, against dequantizing each candidate (same perplexity).
    maxq = (1 << bits) - 1
    lo, hi = np.minimum(w.min(axis=2), 0), np.maximum(w.max(axis=2), 0)
    if symmetric:
        unit = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -float(1 << (bits - 1))
        zero = np.full(unit.shape, 1 << (bits - 1), np.float32)
    else:
        unit = (hi - lo) / np.float32(maxq)
        zero = np.clip(np.round(-lo / np.where(unit == 0, 1, unit)), 0, maxq)
    u = w / np.where(unit == 0, 1, unit)[..., None]
    if symmetric:
        low, high = -float(1 << (bits - 1)), float(maxq - (1 << (bits - 1)))
    else:
        low = np.ascontiguousarray(np.broadcast_to(-zero[..., None], w.shape))
        high = low + np.float32(maxq)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_ratio = np.ones(lo.shape, np.float32)
    q = np.empty_like(u)
    for ratio in CLIP_RATIOS.astype(np.float32):
        np.multiply(u, np.float32(1) / ratio, out=q)
        np.rint(q, out=q)
        np.maximum(q, low, out=q)
        np.minimum(q, high, out=q)
        err = ratio * (ratio * _block_dots(q, q) - 2 * _block_dots(q, u))
        better = err < best_err
        best_err, best_ratio = np.where(better, err, best_err), np.where(better, ratio, best_ratio)
    scales = unit * best_ratio  # float32 already: unit comes from float32 weights, best_ratio is float32
    return _codes(w, scales, zero, maxq).astype(np.uint8).reshape(w.shape[0], -1), scales, zero.astype(np.float32, copy=False)


def _block_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b) over the last axis, [rows, blocks]: a batched matmul, faster than einsum or multiply-and-sum."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int) -> np.ndarray:
    q = w / np.where(scale == 0, 1, scale)[..., None]
    np.round(q, out=q)
    q += zero[..., None]
    return np.clip(q, 0, maxq, out=q)


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int) -> np.ndarray:
    """The [K, N] weight MatMulNBits computes with."""
    k = codes.shape[1]
    s = np.repeat(scales, block_size, axis=1)[:, :k]
    z = np.repeat(zeros, block_size, axis=1)[:, :k]
    return (s * (codes.astype(np.float64) - z)).T


def pack_matmul_nbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block_size: int,
                      symmetric: bool):
    """MatMulNBits initializers (B, scales, zero_points or None) from codes [N, K] on a block grid."""
    n, k = codes.shape
    blocks = -(-k // block_size)
    if k == blocks * block_size:
        padded = codes
    else:
        padded = np.zeros((n, blocks * block_size), dtype=np.uint8)
        padded[:, :k] = codes  # codes past K are never read (the op takes K); zero, as ORT's packer leaves them
    if bits == 4:
        packed = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(n, blocks, block_size // 2)
    else:
        packed = padded.reshape(n, blocks, block_size)
    zero_points = None
    if not symmetric:
        z = zeros.astype(np.uint8)
        if bits == 4:
            if blocks % 2:  # the unused high nibble holds 8, as in ORT's packer
                z = np.pad(z, ((0, 0), (0, 1)), constant_values=8)
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        zero_points = np.ascontiguousarray(z)
    return np.ascontiguousarray(packed), scales.astype(np.float32), zero_points
