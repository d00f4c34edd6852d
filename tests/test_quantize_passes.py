"""The precision passes one by one: the graph after each, a graph each must not touch, numeric parity.

Numeric parity for a quantized op means: ORT (its graph optimizations off) computes what the quantized
weights say -- the dequantized matrix times the input -- not what the fp32 weights said.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from luffy.passes import gptq
from luffy.passes.convert_bf16 import ConvertBfloat16
from luffy.passes.convert_fp16 import ConvertFloat16
from luffy.runtimes.cpu_bf16 import emulate_bf16
from luffy.passes.quantize_dynamic_int8 import QuantizeDynamicInt8
from luffy.runtimes.cpu_features import int8_kernel_path, u8s8_saturates
from luffy.passes.quantize_weights import QuantizeWeights, WeightQuantization, _ort_nbits

from .graphs import op_counts


def _session(model: ir.Model, optimize: bool = False):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _matmul_model(weight: np.ndarray | None, k: int = 64, n: int = 48) -> ir.Model:
    """y = x @ W with W a constant (or, when ``weight`` is None, a second graph input)."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", k]), type=ir.TensorType(ir.DataType.FLOAT))
    inputs = [x]
    if weight is None:
        w = ir.Value(name="w", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT))
        inputs.append(w)
        initializers = []
    else:
        w = ir.Value(name="w", const_value=ir.tensor(weight), shape=ir.Shape(list(weight.shape)),
                     type=ir.TensorType(ir.DataType.FLOAT))
        initializers = [w]
    node = ir.node("MatMul", [x, w], name="proj")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph(inputs, [node.outputs[0]], nodes=[node], initializers=initializers, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


@pytest.fixture(scope="module")
def llama_graph(zoo_artifacts):
    """The -O2 fp32 llama-tiny graph (GQA, rotary, fused norms), loaded fresh per use."""
    artifact, _ = zoo_artifacts("llama-tiny")
    return lambda: ir.load(artifact.path / "model.onnx")


# -- the arithmetic --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k,block", [(256, 32), (96, 64), (200, 32), (128, 128)])
def test_luffy_packing_is_byte_identical_to_onnxruntime(bits, symmetric, k, block):
    # GPTQ's codes are packed by luffy; RTN's by ORT. Same grid in, same bytes out.
    w = np.random.default_rng(k + bits).standard_normal((k, 24)).astype(np.float32)
    nbits = _ort_nbits()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    packed, scales, zero_points = nbits.DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
    mine = gptq.pack_matmul_nbits(*gptq.rtn(w, bits, block, symmetric), bits, block, symmetric)
    assert np.array_equal(packed, mine[0])
    np.testing.assert_allclose(scales.reshape(mine[1].shape), mine[1], rtol=1e-6)
    if not symmetric:
        assert np.array_equal(zero_points.reshape(mine[2].shape), mine[2])


def test_gptq_lowers_output_error_below_rtn():
    # Correlated features with a few outliers, as in real activations: GPTQ should spend its rounding
    # error where the inputs are small.
    rng = np.random.default_rng(0)
    k, n, tokens = 128, 64, 2048
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((tokens, k)) @ mix
    x[:, :4] *= 20.0
    w = rng.standard_normal((k, n)).astype(np.float32)
    hessian = x.T @ x / tokens
    errors = {}
    for name, result in (("rtn", gptq.rtn(w, 4, 32, False)), ("gptq", gptq.gptq(w, hessian, 4, 32, False))):
        errors[name] = np.linalg.norm(x @ (gptq.dequantize(*result, 32) - w)) / np.linalg.norm(x @ w)
    assert errors["gptq"] < 0.7 * errors["rtn"], errors



def _textbook_gptq(w, hessian, bits, block, symmetric):
    """GPTQ as the paper states it: one column at a time, each error spread over every later column at once,
    U = cholesky(inv(H + damp)).T. No lazy batches, no slabs, no reversed factorization."""
    k = len(hessian)
    h = hessian.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += gptq.GPTQ_DAMP * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    work = w.T.astype(np.float64)
    work[:, dead] = 0.0
    codes, scales, zeros = np.zeros(work.shape, np.uint8), np.zeros((w.shape[1], k // block)), np.zeros((w.shape[1], k // block))
    for i in range(k):
        b = i // block
        if i % block == 0:
            scales[:, b], zeros[:, b] = gptq.block_grid(work[:, i:i + block], bits, symmetric)
        codes[:, i] = gptq.quantize_column(work[:, i], scales[:, b], zeros[:, b], bits)
        err = (work[:, i] - scales[:, b] * (codes[:, i] - zeros[:, b])) / u[i, i]
        work[:, i:] -= np.outer(err, u[i, i:])
    return codes, scales, zeros


@pytest.mark.parametrize("bits,block,symmetric,k", [(4, 16, False, 288), (4, 128, False, 384), (8, 32, True, 288)])
def test_gptq_equals_the_textbook_algorithm(bits, block, symmetric, k):
    # 288 features: two full lazy batches of 128 and a partial one; 3 features never active (dead)
    rng = np.random.default_rng(1)
    n, tokens = 40, 700
    x = rng.standard_normal((tokens, k)) * rng.uniform(0.2, 3.0, k)
    x[:, [0, 77, 200]] = 0.0
    hessian = x.T @ x / tokens
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    factor = gptq.hessian_factor(hessian)
    codes, scales, zeros = gptq.gptq(w, factor, bits, block, symmetric)
    ref_codes, ref_scales, ref_zeros = _textbook_gptq(w, hessian, bits, block, symmetric)
    assert factor.dead.tolist() == (np.diag(hessian) == 0).tolist()
    assert np.mean(codes != ref_codes) < 1e-3  # summation order may flip a code sitting on a rounding boundary
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(zeros, ref_zeros)
    assert not gptq.dequantize(codes, scales, zeros, block)[[0, 77, 200]].any()  # dead features' weights: zero
    # a Hessian given as such is factored the same way
    np.testing.assert_array_equal(gptq.gptq(w, hessian, bits, block, symmetric)[0], codes)


def test_hessian_factor_is_the_upper_factor_of_the_damped_inverse():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 64))
    x[:, 5] = 0.0
    hessian = x.T @ x / 300
    factor = gptq.hessian_factor(hessian)
    damped = hessian.copy()
    damped[5, 5] = 1.0
    damped[np.diag_indices(64)] += gptq.GPTQ_DAMP * np.mean(np.diag(damped))
    assert np.allclose(np.triu(factor.upper), factor.upper)
    np.testing.assert_allclose(factor.upper.T @ factor.upper, np.linalg.inv(damped), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq.hessian_factor(-np.eye(8))


def test_shared_factors_factor_each_input_once():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 32))
    shared = gptq.SharedFactors({"x": x.T @ x / 100})
    assert shared and not gptq.SharedFactors({})
    assert shared.get("y") is None
    first = shared.get("x")()
    assert shared.get("x")() is first  # Q, K and V read "x": one factorization
    np.testing.assert_allclose(first.upper, gptq.hessian_factor(x.T @ x / 100).upper)

# -- quantize-weights ------------------------------------------------------------------------------

def test_quantize_weights_graph(llama_graph):
    model = llama_graph()
    matmuls = op_counts(model)["MatMul"]
    qw = QuantizeWeights(WeightQuantization(bits=4, block_size=32, quantize_embeddings=True))
    qw(model)
    ops = op_counts(model)
    assert ops.get("MatMul", 0) == 0
    assert ops["MatMulNBits"] == matmuls == qw.stats["matches"] - 1  # + the embedding
    assert ops["GatherBlockQuantized"] == 1
    bits = {d["role"]: d["bits"] for d in qw.stats["decisions"]}
    assert bits == {"body": 4, "lm_head": 8, "embedding": 4}
    head = [n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["bits"].as_int() == 8]
    assert len(head) == 1 and head[0].attributes["N"].as_int() == 320  # the vocabulary


def test_quantize_weights_leaves_activation_matmuls_alone():
    model = _matmul_model(None)  # both operands are activations (like attention's QK^T): no weight to quantize
    qw = QuantizeWeights(WeightQuantization(bits=4))
    result = qw(model)
    assert not result.modified
    assert op_counts(model) == {"MatMul": 1}
    assert qw.stats["not_matched"][0]["reason"] == "weight is not a constant 2-D float matrix"


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
@pytest.mark.parametrize("method", ["rtn", "gptq", "rtn-clipped"])
def test_quantize_weights_parity_with_dequantized_weight(bits, symmetric, method):
    rng = np.random.default_rng(bits)
    k, n = 64, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    hessians = {"x": x.T.astype(np.float64) @ x / 5} if method == "gptq" else {}
    model = _matmul_model(w, k, n)
    qw = QuantizeWeights(WeightQuantization(bits=bits, block_size=32, symmetric=symmetric, accuracy_level=0,
                                            hessians=hessians, clip_search=method == "rtn-clipped"))
    qw(model)
    assert qw.stats["decisions"][0]["method"] == method
    got = _session(model).run(None, {"x": x})[0]
    # Rebuild the weight the graph holds from its own initializers.
    node = next(iter(model.graph))
    packed, scales = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
    codes = packed.reshape(n, -1) if bits == 8 else np.stack([packed & 0xF, packed >> 4], -1).reshape(n, -1)
    if len(node.inputs) > 3:
        zp = node.inputs[3].const_value.numpy()
        zeros = np.stack([zp & 0xF, zp >> 4], -1).reshape(n, -1)[:, : scales.shape[1]]
    else:
        zeros = np.full(scales.shape, 1 << (bits - 1))
    expected = x @ gptq.dequantize(codes[:, :k], scales, zeros, 32).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, x @ w, atol=1e-4)  # it really is quantized


@pytest.mark.parametrize("symmetric", [False, True])
def test_clipped_rtn_spends_an_outlier_block_on_its_other_weights(symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    w[::128, :] *= 12  # one outlier per block of 128 along K in every column
    errors = {}
    for name, quantize in (("rtn", gptq.rtn), ("clipped", gptq.clipped_rtn)):
        codes, scales, zeros = quantize(w, 4, 128, symmetric)
        assert codes.shape == (64, 256) and codes.max() <= 15 and scales.shape == zeros.shape == (64, 2)
        errors[name] = float(np.square(gptq.dequantize(codes, scales, zeros, 128) - w).mean())
    assert errors["clipped"] < 0.95 * errors["rtn"], errors  # measured 0.88-0.93x here
    # the unclipped range is one of the candidates: never worse than round-to-nearest, block by block
    plain = rng.standard_normal((128, 8)).astype(np.float32)
    err = {name: np.square(gptq.dequantize(*q(plain, 4, 128, symmetric), 128) - plain).sum(axis=0)
           for name, q in (("rtn", gptq.rtn), ("clipped", gptq.clipped_rtn))}
    assert (err["clipped"] <= err["rtn"] + 1e-4).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_clipped_rtn_picks_each_blocks_least_error_candidate(symmetric):
    """The search scores candidates by an expanded error (scale^2 q.q - 2 scale q.w): each block's choice must
    be the candidate whose dequantized block is nearest the weights, each candidate quantized in float64."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((256, 48)) * 0.02).astype(np.float32)
    w[rng.integers(0, 256, 40), rng.integers(0, 48, 40)] *= 8  # scattered outliers: the ratios really differ
    codes, scales, zeros = gptq.clipped_rtn(w, 4, 64, symmetric)
    chosen = np.square(gptq.dequantize(codes, scales, zeros, 64) - w).reshape(4, 64, 48).sum(axis=1)
    maxq, blocks = 15, w.reshape(4, 64, 48).astype(np.float64)
    lo, hi = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
    best = np.full(lo.shape, np.inf)
    for ratio in gptq.CLIP_RATIOS:
        if symmetric:
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) * ratio / -8.0
            zero = np.full(scale.shape, 8.0)
        else:
            scale = (hi - lo) * ratio / maxq
            zero = np.clip(np.round(-lo * ratio / scale), 0, maxq)
        q = np.clip(np.round(blocks / scale[:, None]) + zero[:, None], 0, maxq)
        best = np.minimum(best, np.square(scale[:, None] * (q - zero[:, None]) - blocks).sum(axis=1))
    assert (chosen.T <= best.T * (1 + 1e-5) + 1e-12).all() and (chosen >= best * (1 - 1e-5)).all()
    plain = np.square(gptq.dequantize(*gptq.rtn(w, 4, 64, symmetric), 64) - w).reshape(4, 64, 48).sum(axis=1)
    assert (chosen < 0.99 * plain).sum() > 10  # the outliers' blocks took a clipped range


def test_weight_kernels_are_chosen_per_cpu():
    from luffy.runtimes.cpu_features import weight_kernels

    vnni = weight_kernels(frozenset({"avx2", "avx512_vnni"}), "x86_64")
    assert (vnni["block_size"], vnni["accuracy_level"], vnni["cpu"]) == (128, 4, "x86_64 avx512_vnni")
    # int8 keeps q8_0's block: int8 products quantize the activations per block too, and 128 loses more
    vnni8 = weight_kernels(frozenset({"avx2", "avx512_vnni"}), "x86_64", bits=8)
    assert (vnni8["block_size"], vnni8["accuracy_level"]) == (32, 4) and "q8_0" in vnni8["why"]
    assert weight_kernels(frozenset({"avx2", "amx_int8", "avx512_vnni"}), "x86_64")["cpu"] == "x86_64 amx_int8"
    avx2 = weight_kernels(frozenset({"avx2"}), "x86_64")
    assert avx2["accuracy_level"] == 4 and "measured on an AVX512-VNNI CPU" in avx2["why"]
    assert weight_kernels(frozenset(), "aarch64")["accuracy_level"] == 4
    assert weight_kernels(frozenset({"sse4_2"}), "x86_64") == {
        "cpu": "x86_64", "block_size": 32, "accuracy_level": 0,
        "why": "no int8 dot-product kernels in MLAS for this CPU: fp32 products, ORT's default block"}


# -- convert-fp16 ----------------------------------------------------------------------------------

def test_convert_fp16_graph(llama_graph):
    model = llama_graph()
    new = ConvertFloat16()(model).model
    floats = [v for v in new.graph.initializers.values() if v.dtype == ir.DataType.FLOAT]
    halves = [v for v in new.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16]
    assert halves and sum(v.const_value.size for v in floats) < 0.01 * sum(v.const_value.size for v in halves)
    io = {v.name: v.dtype for v in (*new.graph.inputs, *new.graph.outputs)}
    assert io["logits"] == ir.DataType.FLOAT  # sampling reads fp32
    assert all(t == ir.DataType.FLOAT16 for name, t in io.items() if name.startswith(("past_key", "present.")))
    assert op_counts(new)["MatMul"] == op_counts(model)["MatMul"]


@pytest.mark.parametrize("convert", [ConvertFloat16, ConvertBfloat16])
def test_convert_half_leaves_integer_graphs_alone(convert):
    x = ir.Value(name="x", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.INT64))
    node = ir.node("Add", [x, x])
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.INT64
    model = ir.Model(ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 20}), ir_version=10)
    new = convert()(model).model
    assert op_counts(new) == {"Add": 1}
    assert new.graph.outputs[0].dtype == ir.DataType.INT64


def test_convert_fp16_parity():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    model = _matmul_model(w)
    new = ConvertFloat16()(model).model
    got = _session(new).run(None, {"x": x})[0]
    assert got.dtype == np.float32  # graph I/O stays fp32
    expected = x.astype(np.float16).astype(np.float32) @ w.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-2)


# -- convert-bf16 (checked on the CPU through runtimes/cpu_bf16's emulation) --------------------------

def test_convert_bf16_graph(llama_graph):
    model = llama_graph()
    half = ConvertFloat16()(llama_graph()).model
    new = ConvertBfloat16()(model).model
    values = [*new.graph.inputs, *new.graph.initializers.values()] + [o for n in new.graph for o in n.outputs]
    assert not [v.name for v in values if v.dtype == ir.DataType.FLOAT16]
    assert sum(v.dtype == ir.DataType.BFLOAT16 for v in new.graph.initializers.values()) == \
        sum(v.dtype == ir.DataType.FLOAT16 for v in half.graph.initializers.values()) > 0
    io = {v.name: v.dtype for v in (*new.graph.inputs, *new.graph.outputs)}
    assert io["logits"] == ir.DataType.FLOAT
    assert all(t == ir.DataType.BFLOAT16 for name, t in io.items() if name.startswith(("past_key", "present.")))
    assert op_counts(new) == op_counts(half)  # fp16's fp32 islands and boundary casts, relabelled
    targets = [n.attributes["to"].value for n in new.graph if n.op_type == "Cast"]
    assert ir.DataType.FLOAT16 not in targets and ir.DataType.FLOAT in targets  # logits: bf16 -> fp32


def test_convert_bf16_rounds_weights_from_fp32_not_fp16():
    # 1e-6 flushes to zero in fp16 but is a normal bf16 number; float32's min (an additive mask) rounds to
    # -inf in bf16 and is clipped to bf16's finite range instead.
    w = np.full((64, 48), 1e-6, np.float32)
    w[0, 0] = np.finfo(np.float32).min
    new = ConvertBfloat16()(_matmul_model(w)).model
    got = new.graph.initializers["w"].const_value.numpy().astype(np.float32)
    assert np.isfinite(got).all() and got[0, 0] < -3.3e38
    np.testing.assert_allclose(got[1:], 1e-6, rtol=2 ** -8)


def test_convert_bf16_parity_through_cpu_emulation():
    import torch

    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    new = ConvertBfloat16()(_matmul_model(w)).model
    rounded = emulate_bf16(new)
    assert rounded >= 2 and not [v for v in new.graph.initializers.values() if v.dtype != ir.DataType.FLOAT]
    got = _session(new).run(None, {"x": x})[0]
    # torch's bf16 matmul: bf16 inputs, fp32 accumulation, bf16 result
    expected = (torch.from_numpy(x).bfloat16() @ torch.from_numpy(w).bfloat16()).float().numpy()
    np.testing.assert_allclose(got, expected, rtol=2 ** -7, atol=1e-6)
    assert not np.allclose(got, x @ w, rtol=1e-4)  # it really is bf16


def test_cpu_emulation_keeps_graph_io_names(llama_graph):
    new = ConvertBfloat16()(llama_graph()).model
    names = [v.name for v in (*new.graph.inputs, *new.graph.outputs)]
    emulate_bf16(new)
    assert [v.name for v in (*new.graph.inputs, *new.graph.outputs)] == names
    assert all(v.dtype == ir.DataType.FLOAT for v in new.graph.inputs if v.name.startswith("past_key"))
    session = _session(new, optimize=True)  # every op has an fp32 kernel now
    assert [i.name for i in session.get_inputs()] == [v.name for v in new.graph.inputs]


# -- quantize-dynamic-int8 -------------------------------------------------------------------------

def test_quantize_dynamic_int8_graph(llama_graph):
    model = llama_graph()
    matmuls = op_counts(model)["MatMul"]
    qd = QuantizeDynamicInt8()
    new = qd(model).model
    ops = op_counts(new)
    assert ops.get("MatMul", 0) == 0
    assert ops["MatMulInteger"] == matmuls == qd.stats["matches"]
    assert ops["DynamicQuantizeLinear"] >= 1


def test_quantize_dynamic_int8_leaves_activation_matmuls_alone():
    model = _matmul_model(None)
    result = QuantizeDynamicInt8()(model)
    assert not result.modified
    assert op_counts(result.model) == {"MatMul": 1}


# "auto" is what luffy.compile picks on this CPU: 8-bit weights where ORT's int8 kernels have VNNI, 7-bit
# (reduce_range) where they saturate; the test id names the path this machine took.
_INT8_PATH = int8_kernel_path()


@pytest.mark.parametrize("reduce_range", [
    pytest.param(u8s8_saturates(), id=f"auto-{_INT8_PATH}-reduce_range={u8s8_saturates()}"),
    pytest.param(True, id="reduce_range=True"),
])
def test_quantize_dynamic_int8_parity(reduce_range):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    new = QuantizeDynamicInt8(reduce_range)(_matmul_model(w)).model
    got = _session(new).run(None, {"x": x})[0]
    # int8 per-channel weights and uint8 per-tensor activations: about 1% of the output's scale (a saturating
    # kernel fed 8-bit weights errs by ~35%: 7.5 on outputs of scale 21, measured on an AVX2-only EPYC)
    expected = x @ w
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert not np.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weights_qdq_parity_with_dequantized_weight(bits):
    # The TensorRT layout: standard DequantizeLinear (int4 blockwise / int8 per channel) + the same MatMul.
    rng = np.random.default_rng(10 + bits)
    k, n = 64, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    model = _matmul_model(w, k, n)
    model.opset_imports[""] = 23
    QuantizeWeights(WeightQuantization(bits=bits, block_size=32, layout="qdq"))(model)
    assert op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1}
    codes, scales, zeros = gptq.rtn(w, bits, 32 if bits == 4 else k, True)
    expected = x @ gptq.dequantize(codes, scales, zeros, 32 if bits == 4 else k).astype(np.float32)
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def _tied_model(table: np.ndarray) -> ir.Model:
    """embedding = table[ids]; logits = embedding @ table^T (a tied head, as exporters leave it: a Transpose).
    A past_key_values input, unused, makes it a decoder step graph as find_lm_head wants one."""
    n, k = table.shape
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    past = ir.Value(name="past_key_values.0.key", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    weights = ir.Value(name="table", const_value=ir.tensor(table), shape=ir.Shape([n, k]),
                       type=ir.TensorType(ir.DataType.FLOAT))
    gather = ir.node("Gather", [weights, ids], attributes={"axis": 0}, name="embed")
    transpose = ir.node("Transpose", [weights], attributes={"perm": [1, 0]}, name="head_t")
    head = ir.node("MatMul", [gather.outputs[0], transpose.outputs[0]], name="lm_head")
    for value, name, shape in [(gather.outputs[0], "embedding", ["batch", "seq", k]),
                               (transpose.outputs[0], "head_t", [k, n]), (head.outputs[0], "logits", ["batch", "seq", n])]:
        value.name, value.dtype, value.shape = name, ir.DataType.FLOAT, ir.Shape(shape)
    graph = ir.Graph([ids, past], [gather.outputs[0], head.outputs[0]], nodes=[gather, transpose, head],
                     initializers=[weights], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
def test_tied_table_is_gathered_from_the_heads_codes_with_no_copy(bits, symmetric):
    rng = np.random.default_rng(bits)
    n, k = 96, 128
    table = rng.standard_normal((n, k)).astype(np.float32)
    model = _tied_model(table)
    qw = QuantizeWeights(WeightQuantization(bits=bits, lm_head_bits=bits, block_size=32, symmetric=symmetric,
                                            accuracy_level=0, quantize_embeddings=True))
    qw(model)
    gather = next(node for node in model.graph if node.op_type == "GatherBlockQuantized")
    head = next(node for node in model.graph if node.op_type == "MatMulNBits")
    assert gather.inputs[0] is head.inputs[1]  # the head's codes as they are: ORT folds no copy of them at load
    assert gather.attributes["quantize_axis"].as_int() == 2
    assert [d["role"] for d in qw.stats["decisions"]] == ["lm_head", "embedding"]
    ids = rng.integers(0, n, (2, 5)).astype(np.int64)
    past = np.zeros(1, np.float32)
    embedding, logits = _session(model, optimize=True).run(None, {"input_ids": ids, "past_key_values.0.key": past})
    # the whole table as the gather reads it; the head must multiply by that same matrix
    dequantized = _session(model).run(None, {"input_ids": np.arange(n, dtype=np.int64)[None],
                                             "past_key_values.0.key": past})[0][0]  # [n, k]
    np.testing.assert_array_equal(embedding, dequantized[ids])
    np.testing.assert_allclose(logits, embedding @ dequantized.T, rtol=1e-4, atol=1e-4)
    assert not np.allclose(dequantized, table, atol=1e-3)  # it really is quantized
