"""Does a request get the same bits in a batch as alone? A probe of this CPU's weight kernels.

A server batches requests; it returns a request the output it gets alone only where every kernel computes a
row the same way whatever else shares the batch. ONNX Runtime's fp32 MatMul does. Its MatMulNBits does not
always: at accuracy level 0 a single row takes a GEMV path and a batch a dequantize + SGEMM path, and at level 4
(int8 products) with blocks of 128 (int8) or 64 and up (int4), MLAS computes a batch's odd last row, and a lone
row, with a one-row kernel whose sums differ in the last bits from its two-row kernel's (measured on a Sapphire
Rapids CPU with ORT 1.32: `python -m luffy.benchmarks.kernels` has the table). Those bits rarely change a
token, but on a near tie greedy decoding takes the other branch, and the rest of the output follows it.

Which settings are invariant is MLAS's business and may change with the CPU and the ORT release, so nothing
here is a table: `nbits_batch_invariant` builds the artifact's kernel on a small random weight and compares
each row alone with the same rows in an odd and an even batch (a few milliseconds, once per setting).
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

PROBE_K, PROBE_N, PROBE_ROWS = 512, 64, 5


@functools.lru_cache(maxsize=None)
def nbits_batch_invariant(bits: int, block_size: int, accuracy_level: int, symmetric: bool) -> bool:
    """True when this CPU's MatMulNBits with these settings gives every row the same bits alone (M=1) as in
    batches of PROBE_ROWS and PROBE_ROWS + 1.

    >>> nbits_batch_invariant(4, 32, 4, False) in (True, False)
    True
    """
    return rows_match_alone(_matmul_nbits(bits, block_size, accuracy_level, symmetric), PROBE_K)


def rows_match_alone(session: ort.InferenceSession, k: int, rows: int = PROBE_ROWS) -> bool:
    """True when each of ``rows`` rows of a one-input session (A [M, k]) gives the same bits alone (M=1) as inside
    batches of ``rows`` and ``rows + 1`` (an odd and an even M)."""
    a = np.random.default_rng(0).standard_normal((rows + 1, k)).astype(np.float32)
    alone = np.concatenate([session.run(None, {"A": a[i:i + 1]})[0] for i in range(rows)])
    return all(np.array_equal(session.run(None, {"A": a[:m]})[0][:rows], alone) for m in (rows, rows + 1))


def matmul_session(nodes: list, inits: list, k: int, n: int) -> ort.InferenceSession:
    """A one-thread session over ``nodes`` reading A [M, k] and writing Y [M, n] (opset 21 + com.microsoft)."""
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _matmul_nbits(bits: int, block: int, accuracy: int, symmetric: bool) -> ort.InferenceSession:
    """One MatMulNBits over random codes (the kernel path does not depend on the values)."""
    rng = np.random.default_rng(1)
    blocks = PROBE_K // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (PROBE_N, blocks, block * bits // 8), dtype=np.uint8), "B"),
             numpy_helper.from_array((rng.random(PROBE_N * blocks) * 0.01 + 0.001).astype(np.float32), "S")]
    if not symmetric:  # zero points packed like the codes, two per byte at 4 bits
        inits.append(numpy_helper.from_array(
            rng.integers(0, 256, PROBE_N * ((blocks * bits + 7) // 8), dtype=np.uint8), "Z"))
    node = helper.make_node("MatMulNBits", ["A", *[t.name for t in inits]], ["Y"], domain="com.microsoft",
                            K=PROBE_K, N=PROBE_N, bits=bits, block_size=block, accuracy_level=accuracy)
    return matmul_session([node], inits, PROBE_K, PROBE_N)


def artifact_kernels(manifest: dict) -> list[dict]:
    """The MatMulNBits settings an ORT artifact's weights run with (body and head), each with whether it is
    batch-invariant on this CPU; [] for an artifact without them (fp32, fp16, TensorRT)."""
    scheme = (((manifest.get("report") or {}).get("precision") or {}).get("scheme")) or {}
    if manifest.get("target", "ort") != "ort" or scheme.get("layout", "matmulnbits") != "matmulnbits" \
            or "bits" not in scheme:
        return []
    settings = {(scheme["bits"], scheme["block_size"], scheme.get("accuracy_level", 0), scheme.get("symmetric", False))}
    if scheme.get("lm_head_bits"):
        settings.add((scheme["lm_head_bits"], scheme["block_size"], scheme.get("accuracy_level", 0),
                      scheme.get("symmetric", False)))
    return [{"bits": b, "block_size": blk, "accuracy_level": acc, "symmetric": sym,
             "batch_invariant": nbits_batch_invariant(b, blk, acc, sym)} for b, blk, acc, sym in sorted(settings)]


def variance_warning(manifest: dict) -> str | None:
    """One line for a server's log when some weight kernel of the artifact is not batch-invariant here."""
    variant = [k for k in artifact_kernels(manifest) if not k["batch_invariant"]]
    if not variant:
        return None
    names = ", ".join(f"int{k['bits']} block {k['block_size']} accuracy level {k['accuracy_level']}" for k in variant)
    return (f"this CPU's MatMulNBits kernels ({names}) are not batch-invariant: a request batched with others can "
            "differ from the same request alone where two tokens nearly tie; compile with --batch-invariant for "
            "identical outputs (docs/serving.md)")
