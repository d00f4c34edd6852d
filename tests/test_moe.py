"""Mixture-of-experts decoders: captured through transformers' batched_mm experts, fused into com.microsoft MoE.

Families are random-weight configs saved as real HF directories and compiled from disk at the default
-O2, held to the decoder contract (fp32 logits within 1e-4 of PyTorch, greedy tokens identical to
transformers' generate). fuse-moe is tested on real transformers MoE blocks exported by torch.onnx: the
graph after it, blocks it must leave alone, and parity with the unfused graph on ORT with its own
optimizations off.
"""

import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import luffy
from luffy.errors import UnsupportedModelError
from luffy.passes.driver import run_passes
from luffy.passes.fuse_moe import fuse_moe
from luffy.passes.pipelines import CLEANUP
from luffy.tests.graphs import op_counts
from luffy.tests.helpers import (COMMON, PROMPT, assert_engine_matches_transformers, assert_transformers_generates,
                                 compiled_families, make_hf_dir)

ATOL = 1e-4
TOP2 = dict(COMMON, num_experts_per_tok=2)
# Both routings ORT's MoE has (top-k weights renormalized or not), and Qwen2-MoE's shared expert beside it.
MOE_FAMILIES = {
    "mixtral": dict(TOP2, num_local_experts=4),  # renormalized top-k
    "qwen2_moe": dict(TOP2, num_experts=4, moe_intermediate_size=128, shared_expert_intermediate_size=128),
    "qwen3_moe": dict(TOP2, num_experts=4, moe_intermediate_size=128, head_dim=16, norm_topk_prob=True),
    "olmoe": dict(TOP2, num_experts=4, eos_token_id=2),  # softmax weights as they are
}


# transformers fuses each layer's per-expert checkpoint tensors into batched ones on load, which the streamed
# capture does not replay: MoE directories take the whole-model path, and the report says why in one line.
FALLBACK = re.compile(r"^whole-model capture: the streamed path does not apply \(transformers converts checkpoint "
                      r"tensors such as model\.layers\.0\.\S+\.experts\.0\.\S+\.weight on load \(they become parts of "
                      r"other tensors\), which the streamed path does not replay\)$")


@pytest.fixture(scope="module")
def moe_artifact(tmp_path_factory):
    """family -> (Artifact compiled at -O2 from the saved HF directory, torch model), once per module."""
    return compiled_families(tmp_path_factory, MOE_FAMILIES)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_family_parity_greedy_and_fused(moe_artifact, family):
    artifact, model = moe_artifact(family)
    report = artifact.report
    assert "streamed" not in report["capture"]
    assert len([note for note in report["capture"]["notes"] if FALLBACK.match(note)]) == 1, report["capture"]["notes"]
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= ATOL
    layers = model.config.num_hidden_layers
    assert report["op_histogram"]["com.microsoft::MoE"] == layers
    assert "TopK" not in report["op_histogram"]  # the routing is inside MoE
    engine = artifact.load()
    assert_engine_matches_transformers(engine, model, ATOL)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_ragged_batch_matches_transformers(moe_artifact, family):
    artifact, model = moe_artifact(family)
    engine = artifact.load()
    rows = [PROMPT[:3], PROMPT, PROMPT[5:12]]
    batch = engine.generate(rows, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    width = len(PROMPT)
    for i, row in enumerate(rows):
        alone = engine.generate([row], max_new_tokens=24, eos_token_id=None)
        assert batch[i, width:].tolist() == alone[0, len(row):].tolist()
    assert_transformers_generates(model, batch, rows, 24)


def test_family_that_cannot_be_captured_is_refused_in_one_line(tmp_path):
    # Llama4's experts export; its rotary multiplies complex tensors, which torch.onnx cannot translate.
    config = dict(TOP2, num_local_experts=4, head_dim=16, interleave_moe_layer_step=1, intermediate_size_mlp=128)
    make_hf_dir("llama4_text", config, tmp_path / "hf")
    with pytest.raises(UnsupportedModelError) as err:
        luffy.compile(str(tmp_path / "hf"), output=tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert message == ("Llama4ForCausalLM: op aten.unsqueeze has no ONNX translation in torch.onnx for "
                       "complex-valued inputs, so the model cannot be captured")
    assert not (tmp_path / "out").exists()


# --- fuse-moe on single transformers MoE blocks --------------------------------------------------------------


def _export_block(family: str, **overrides) -> ir.Model:
    """A real transformers sparse-MoE block (batched_mm experts, as luffy captures them), exported with dynamic
    batch and sequence and cleaned up the way the -O2 pipeline does before fuse-moe."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    settings = MOE_FAMILIES.get(family, dict(TOP2, num_local_experts=4, head_dim=16))
    config = AutoConfig.for_model(family, **{**settings, "num_hidden_layers": 1, **overrides})
    config._experts_implementation = "batched_mm"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = AutoModelForCausalLM.from_config(config).model.layers[0]
        block = next(m for m in layer.modules() if hasattr(m, "experts")).eval()  # mlp, block_sparse_moe, ...
    x = torch.randn(2, 5, config.hidden_size)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True, opset_version=20, verbose=False,
                                    dynamic_shapes=({0: batch, 1: seq},))
    model, _ = run_passes(program.model, CLEANUP)
    return model


def _fused(model: ir.Model):
    fused = ir.from_proto(ir.to_proto(model))  # a copy: the pass works in place
    p = fuse_moe()
    fused = p(fused).model
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    return RemoveUnusedNodesPass()(fused).model, p.stats


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# The three routings ORT's MoE computes: top-k of softmax renormalized (Mixtral; Hunyuan's softmax is over
# dim=1), not renormalized (Qwen3-MoE's default), and a softmax over the top-k logits (Granite-MoE).
@pytest.mark.parametrize("family, normalized", [("mixtral", 1), ("qwen3_moe", 0), ("granitemoe", 1),
                                                ("hunyuan_v1_moe", 1)])
def test_fuse_moe_graph_and_parity(family, normalized):
    model = _export_block(family, **({"norm_topk_prob": False} if family == "qwen3_moe" else {}))
    fused, stats = _fused(model)
    assert stats == {"matches": 1}
    moe = [n for n in fused.graph if n.op_type == "MoE"]
    assert len(moe) == 1 and moe[0].domain == "com.microsoft"
    attrs = {k: a.value for k, a in moe[0].attributes.items()}
    assert attrs == {"k": 2, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                     "activation_beta": 0.0, "normalize_routing_weights": normalized}
    assert not {"TopK", "GatherND", "Softmax", "Split"} & set(op_counts(fused))
    # the experts' silu is gone (Hunyuan's shared MLP keeps its own)
    assert op_counts(fused)["Sigmoid"] == op_counts(model)["Sigmoid"] - 1
    gate_up = next(n for n in model.graph if n.op_type == "GatherND").inputs[0].const_value.numpy()
    fc1 = moe[0].inputs[2].const_value.numpy()
    np.testing.assert_array_equal(fc1[:, 0::2], gate_up[:, :128])  # gate rows interleaved with up rows
    np.testing.assert_array_equal(fc1[:, 1::2], gate_up[:, 128:])
    rng = np.random.default_rng(0)
    for shape in ((1, 1, 64), (3, 9, 64)):  # one decode token; a ragged-sized prefill
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(_run(fused, x), _run(model, x), atol=1e-5, rtol=1e-5)


def test_fuse_moe_leaves_other_expert_activations_alone():
    # ORT's CPU MoE has SwiGLU only as silu(gate) * up; a GELU-gated expert block is not that op.
    model = _export_block("mixtral", hidden_act="gelu")
    fused, stats = _fused(model)
    assert stats["matches"] == 0 and stats["not_matched"]
    assert op_counts(fused) == op_counts(model)


def test_fuse_moe_leaves_a_miswired_repeat_alone():
    # Each token must meet its own k experts: a repeat of 3 against top-2 routing is not ORT's MoE.
    model = _export_block("mixtral")
    expand = next(n for n in model.graph if n.op_type == "Expand")
    assert expand.inputs[1].const_value.numpy().tolist() == [1, 2, 1]
    three = ir.Value(name="repeat_three", const_value=ir.tensor(np.array([1, 3, 1], np.int64)))
    three.shape, three.type = ir.Shape([3]), ir.TensorType(ir.DataType.INT64)
    model.graph.register_initializer(three)
    expand.replace_input_with(1, three)
    _, stats = _fused(model)
    assert stats["matches"] == 0
    assert any("repeat_shape is (1, 3, 1)" in r["reason"] for r in stats["not_matched"])


# --- quantize-moe: the int4/int8 precisions' experts --------------------------------------------------------


def _dequantize(codes, scales, zeros, bits, block):
    """QMoE's weight layout back to float: [E, N, K*bits/8] codes, [E, N, K/block] scales, packed zero points."""
    def unpack(packed):
        return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1) if bits == 4 else packed

    q = unpack(codes).astype(np.float32)
    e, n, k = q.shape
    z = np.full((e, n, k // block), 2 ** (bits - 1), np.float32) if zeros is None else \
        unpack(zeros).astype(np.float32)[..., : k // block]
    return ((q.reshape(e, n, k // block, block) - z[..., None]) * scales[..., None]).reshape(e, n, k)


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True)])
def test_quantize_moe_writes_qmoe_that_matches_its_dequantized_weights(bits, symmetric):
    from luffy.passes.pipelines import precision_steps
    from luffy.passes.quantize_weights import WeightQuantization

    fused, _ = _fused(_export_block("mixtral"))
    # accuracy_level 0: fp32 activations, so the only difference from MoE is the weights' rounding
    spec = WeightQuantization(bits=bits, symmetric=symmetric, accuracy_level=0)
    assert [s.name for s in precision_steps("int4", spec)] == ["quantize-weights", "quantize-moe",
                                                                "remove-unused-after-precision"]
    quantized, _ = run_passes(ir.from_proto(ir.to_proto(fused)), precision_steps("int4", spec))
    qmoe = [n for n in quantized.graph if n.op_type == "QMoE"]
    assert len(qmoe) == 1 and "MoE" not in op_counts(quantized)
    node = qmoe[0]
    weights = {i: v.const_value.numpy() if v is not None else None for i, v in enumerate(node.inputs) if i >= 2}
    fc1 = _dequantize(weights[2], weights[3], weights.get(11), bits, 32)  # no zero points when symmetric
    fc2 = _dequantize(weights[5], weights[6], weights.get(12), bits, 32)
    moe = next(n for n in fused.graph if n.op_type == "MoE")
    assert np.abs(fc1 - moe.inputs[2].const_value.numpy()).max() < 0.1  # really the experts, rounded
    reference = ir.from_proto(ir.to_proto(fused))  # the fp32 MoE with the rounded weights put in
    ref_moe = next(n for n in reference.graph if n.op_type == "MoE")
    for index, array in ((2, fc1), (4, fc2)):
        ref_moe.inputs[index].const_value = ir.tensor(array.astype(np.float32))
    x = np.random.default_rng(0).standard_normal((2, 7, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(quantized, x), _run(reference, x), atol=1e-5, rtol=1e-4)


def test_quantize_moe_keeps_experts_the_block_size_does_not_divide():
    from luffy.passes.quantize_moe import quantize_moe
    from luffy.passes.quantize_weights import WeightQuantization

    fused, _ = _fused(_export_block("mixtral"))
    p = quantize_moe(WeightQuantization(bits=4, block_size=128))  # hidden size is 64
    p(fused)
    assert p.stats["matches"] == 0 and "MoE" in op_counts(fused)
    assert "must be multiples of the block size 128" in p.stats["decisions"][0]["reason"]
