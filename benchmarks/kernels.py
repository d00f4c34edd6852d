"""One MatMulNBits per setting, timed: what `runtimes/cpu_features.weight_kernels` chooses between.

    python -m luffy.benchmarks.kernels --k 1024 --n 2816 --json kernels.json

For every bits x block size x symmetry x accuracy level, a one-node graph (K x N weights quantized by ORT's
packer) runs at decode (M=1) and prefill (M=128) shapes on one thread; the cell is the best of N runs (a
shared machine's other processes only ever make a run slower). Also ONNX Runtime's DynamicQuantizeMatMul
on the same shape (int8 weights per column, int8 activations per tensor: MLAS QGEMM) and a plain fp32
MatMul, for the prefill comparison.

`batch_invariant` says whether a row's output is the same bits whatever batch it runs in
(runtimes/batch_invariance.rows_match_alone: each of 5 rows alone against the same rows in batches of 5 and 6;
kernels-spr.json was taken with 7 rows and batches of 7 and 8, the same verdicts): a server gives a request the
output it gets alone only where every kernel is. On the Sapphire Rapids CPU measured (benchmarks/results/kernels-spr.json), MLAS's int8-product
kernel (level 4) at blocks of 128 (int8) or 64 and up (int4) computes a batch's odd last row, and a lone row,
with its one-row kernel, whose sums differ in the last bits from its two-row kernel's; level 0 is never
invariant (a lone row takes a GEMV path), the fp32 MatMul always.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
from onnx import helper, numpy_helper

from ..passes.quantize_weights import _ort_rtn
from ..runtimes.batch_invariance import matmul_session, rows_match_alone
from ..runtimes.cpu_features import weight_kernels


def matmul_nbits(w: np.ndarray, bits: int, block: int, symmetric: bool, accuracy: int):
    """(session, bytes per weight) of one MatMulNBits over ``w`` [K, N]."""
    k, n = w.shape
    packed, scales, zeros = _ort_rtn(w, bits, block, symmetric)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(n, -1).astype(np.float32), "S")]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros.reshape(n, -1), "Z"))
    node = helper.make_node("MatMulNBits", ["A", *[t.name for t in inits]], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=accuracy)
    stored = sum(len(t.raw_data) for t in inits)
    return matmul_session([node], inits, k, n), stored / (k * n)


def reference_sessions(w: np.ndarray) -> dict:
    """DynamicQuantizeMatMul (int8 per column) and fp32 MatMul over the same shape."""
    k, n = w.shape
    scale = np.abs(w).max(axis=0) / 127
    codes = np.round(w / np.where(scale == 0, 1, scale)).astype(np.int8)
    dynamic = matmul_session([helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft")],
                       [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scale.astype(np.float32), "S"),
                        numpy_helper.from_array(np.zeros(n, np.int8), "Z")], k, n)
    fp32 = matmul_session([helper.make_node("MatMul", ["A", "B"], ["Y"])], [numpy_helper.from_array(w, "B")], k, n)
    return {"DynamicQuantizeMatMul int8": (dynamic, 1.0), "MatMul fp32": (fp32, 4.0)}


def best_seconds(session, m: int, k: int, runs: int) -> float:
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"A": a})
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"A": a})
        best = min(best, time.perf_counter() - start)
    return best


def measure(k: int, n: int, decode_runs: int = 300, prefill_runs: int = 40) -> list[dict]:
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    cases = {f"MatMulNBits int{b} block {blk}{' symmetric' if sym else ''} level {acc}": matmul_nbits(w, b, blk, sym, acc)
             for b, blk, sym, acc in itertools.product((8, 4), (32, 64, 128), (False, True), (4, 0))}
    cases.update(reference_sessions(w))
    rows = []
    for name, (session, bytes_per_weight) in cases.items():
        decode, prefill = best_seconds(session, 1, k, decode_runs), best_seconds(session, 128, k, prefill_runs)
        rows.append({"kernel": name, "bytes_per_weight": round(bytes_per_weight, 4),
                     "decode_us": round(decode * 1e6, 1), "prefill_ms": round(prefill * 1e3, 3),
                     "batch_invariant": rows_match_alone(session, k)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=2816)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    rows = measure(args.k, args.n)
    print(f"K={args.k} N={args.n}, one thread, best of N; this CPU's choice: {weight_kernels()}")
    print("| kernel | bytes/weight | decode µs (M=1) | prefill ms (M=128) | batch-invariant |\n|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['bytes_per_weight']} | {r['decode_us']} | {r['prefill_ms']} | "
              f"{'yes' if r['batch_invariant'] else 'no'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"k": args.k, "n": args.n, "choice": weight_kernels(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
