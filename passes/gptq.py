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


def gptq(weight_kn: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """GPTQ (Frantar et al. 2022) for a [K, N] MatMul weight and the K x K Hessian of its input (X^T X).

    Columns of the weight (input features) are quantized one at a time, and each one's rounding error is
    spread over the columns not yet quantized, weighted by the inverse Hessian, so the layer's output on
    the calibration activations moves as little as possible. Returns (codes [N, K], scales [N, K/block],
    zeros [N, K/block]) on the grid of `block_grid`, with each block's grid taken when its first column is
    reached (the "static groups" of the reference code, so scales come from the updated weights).
    """
    k, n = weight_kn.shape
    if k % block_size or GPTQ_COLUMNS % block_size:
        raise ValueError(f"GPTQ needs K ({k}) divisible by the block size ({block_size})")
    w = weight_kn.T.astype(np.float64, copy=True)  # [N, K]: rows are outputs, columns the input features
    h = hessian.astype(np.float64, copy=True)
    dead = np.diag(h) == 0  # features never active in calibration: their weights cannot matter to it
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += GPTQ_DAMP * np.mean(np.diag(h))
    # Upper Cholesky factor of H^-1: row i holds the update weights for column i's error.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T

    codes = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, k // block_size))
    zeros = np.zeros((n, k // block_size))
    for i1 in range(0, k, GPTQ_COLUMNS):
        i2 = min(i1 + GPTQ_COLUMNS, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                b = col // block_size
                scales[:, b], zeros[:, b] = block_grid(w1[:, i:i + block_size], bits, symmetric)
            b = col // block_size
            q = quantize_column(w1[:, i], scales[:, b], zeros[:, b], bits)
            codes[:, col] = q
            err = (w1[:, i] - scales[:, b] * (q - zeros[:, b])) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros


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
