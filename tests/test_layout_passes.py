"""rotary-bsd and collapse-reshapes: the layout round trips fuse-gqa leaves around GroupQueryAttention.

Each: the graph after it (op counts), a graph it must not touch, numeric parity on ORT with its graph
optimizations off (--verify's per-pass check against the captured graph) and greedy tokens of the whole
pipeline against transformers.
"""


import numpy as np
import onnx_ir as ir
import pytest

from luffy.compiler.capture.torch_export import capture_causal_lm
from luffy.compiler.sources.resolve import resolve_source
from luffy.compiler.sources.torch_model import load_torch_model
from luffy.passes.collapse_reshapes import _resolve, collapse_reshapes
from luffy.passes.driver import run_passes
from luffy.passes.pipelines import pipeline
from luffy.passes.rotary_bsd import rotary_bsd

from .graphs import op_counts
from .helpers import hf_greedy


@pytest.fixture(scope="module")
def before_layout():
    """llama-tiny's step graph (2 layers) with every -O2 pass before rotary-bsd applied."""
    steps = pipeline("ort", 2)
    upto = [s.name for s in steps].index("rotary-bsd")
    captured = capture_causal_lm(load_torch_model(resolve_source("llama-tiny")))
    captured.model.metadata_props["luffy.max_seq_len"] = "512"  # compile sets it; fuse-rotary sizes cos/sin by it
    model, _ = run_passes(captured.model, steps[:upto])
    return ir.to_proto(model)


def _apply(proto, *passes):
    model = ir.from_proto(proto)
    stats = []
    for p in passes:
        p(model)
        stats.append(p.stats)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model, stats


def test_rotary_bsd_graph_after(before_layout):
    before = op_counts(ir.from_proto(before_layout))
    model, [stats] = _apply(before_layout, rotary_bsd())
    after = op_counts(model)
    assert stats["matches"] == 4  # q and k of 2 layers
    assert after["RotaryEmbedding"] == before["RotaryEmbedding"] == 4
    assert before["Transpose"] == 8 and after["Transpose"] == 0  # one pair around each rotary
    assert before["Reshape"] - after["Reshape"] == 8
    for node in model.graph:
        if node.op_type == "RotaryEmbedding":
            assert node.inputs[0].producer().op_type == "MatMul" and len(node.inputs[0].shape) == 3
            assert {u.node.op_type for u in node.outputs[0].uses()} == {"GroupQueryAttention"}


def test_rotary_bsd_leaves_a_rotary_read_in_head_layout_alone(before_layout):
    model = ir.from_proto(before_layout)
    rotary = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    extra = ir.node("ReduceSum", [rotary.outputs[0]], attributes={"keepdims": 0})
    extra.outputs[0].name = "rotated_checksum"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])  # the [B,H,S,d] result is needed as it is
    p = rotary_bsd()
    p(model)
    assert p.stats["matches"] == 3
    assert rotary in list(model.graph) and rotary.inputs[0].producer().op_type == "Transpose"


def test_collapse_reshapes_graph_after(before_layout):
    before = op_counts(ir.from_proto(before_layout))
    model, [_, stats] = _apply(before_layout, rotary_bsd(), collapse_reshapes())
    after = op_counts(model)
    assert stats["matches"] == 4  # v in, attention out, per layer
    assert before["Reshape"] - after["Reshape"] == 8 + 8
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            assert [node.inputs[i].producer().op_type for i in range(3)] == ["RotaryEmbedding", "RotaryEmbedding", "MatMul"]
            assert {u.node.op_type for u in node.outputs[0].uses()} == {"MatMul"}  # straight into o_proj


def test_collapse_reshapes_keeps_a_reshape_that_changes_the_shape():
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", 64]), type=ir.TensorType(ir.DataType.FLOAT))
    split = ir.node("Reshape", [x, ir.Value(name="s1", const_value=ir.tensor(np.array([0, 0, 4, 16], np.int64)))])
    split.outputs[0].shape = ir.Shape(["batch", "seq", 4, 16])
    merge = ir.node("Reshape", [split.outputs[0], ir.Value(name="s2", const_value=ir.tensor(np.array([0, -1, 16], np.int64)))])
    merge.outputs[0].name = "y"
    graph = ir.Graph([x], [merge.outputs[0]], nodes=[split, merge], opset_imports={"": 20})
    for value in (split.inputs[1], merge.inputs[1]):
        graph.register_initializer(value)
    model = ir.Model(graph, ir_version=10)
    p = collapse_reshapes()
    p(model)
    assert p.stats["matches"] == 0 and op_counts(model)["Reshape"] == 2  # [batch, seq*4, 16] is not x's shape
    # the shape arithmetic it proves with: symbols cancel, integers multiply
    assert _resolve([0, 0, -1], ["batch", "seq", 4, 16]) == ["batch", "seq", 64]
    assert _resolve([0, -1, 16], ["batch", "seq", 4, 16]) is None


def test_layout_passes_at_parity_on_ort(llama_verified):
    verified, _ = llama_verified  # llama-tiny compiled with --verify (conftest), shared with test_verify.py
    records = {r["name"]: r for r in verified.report["passes"]}
    for name in ("rotary-bsd", "collapse-reshapes"):
        assert records[name]["matches"] == 4
        assert records[name]["verified"] and records[name]["max_abs_diff"] <= 1e-5
    assert verified.report["parity"]["passed"] and verified.report["parity"]["max_abs_diff"] <= 1e-4


def test_layout_passes_keep_greedy_tokens_and_ragged_batches(llama_verified, zoo_artifacts):
    _, module = zoo_artifacts("llama-tiny")
    engine = llama_verified[0].load()
    short, long = [1, 17, 33], [1, 17, 33, 5, 90, 7, 64]
    for prompt in (short, long):
        expected, _ = hf_greedy(module, prompt, 10)
        assert np.array_equal(engine.generate([prompt], max_new_tokens=10, eos_token_id=None), expected)
    # left-padded together, each row must still rotate from its own first position
    both = engine.generate([short, long], max_new_tokens=10, eos_token_id=None)
    assert np.array_equal(both[0, -10:], hf_greedy(module, short, 10)[0][0, -10:])
    assert np.array_equal(both[1, -10:], hf_greedy(module, long, 10)[0][0, -10:])


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_rotary_bsd_beyond_the_plain_projection(family_artifact, family):
    # qwen3 normalizes q and k per head ([B,S,H,d]) before rotary: one Reshape replaces the three movements.
    # phi3 rotates x[..., :r] of each head and concatenates x[..., r:]: the op's rotary_embedding_dim does that.
    artifact, _ = family_artifact(family)  # the families test's compile (conftest), parity-checked there too
    layers = artifact.manifest["kv_cache"]["num_layers"]
    records = {r["name"]: r for r in artifact.report["passes"]}
    assert records["rotary-bsd"]["matches"] == 2 * layers
    if family == "qwen3":
        assert "Transpose" not in artifact.report["op_histogram"]
    else:
        rotaries = [n for n in ir.load(artifact.path / "model.onnx").graph if n.op_type == "RotaryEmbedding"]
        assert all(n.attributes["rotary_embedding_dim"].value == 8 and len(n.inputs[0].shape) == 3 for n in rotaries)
    assert artifact.report["parity"]["passed"] and artifact.report["parity"]["max_abs_diff"] <= 1e-4
