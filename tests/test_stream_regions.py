"""compiler/stream/regions.py: where a graph's nodes run when it runs one layer's weights at a time."""

import numpy as np
import onnx_ir as ir

from luffy.compiler.stream.regions import PROLOGUE, RegionRunner, assign_regions


def _tied_model(table: np.ndarray, layer: np.ndarray) -> ir.Model:
    """ids -> Gather(table) -> MatMul(layers.0 weight) -> MatMul(Transpose(table)): a tied embedding and head."""
    def weight(name, array):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape),
                        const_value=ir.tensor(array, name=name))

    table_v, layer_v = weight("model.embed_tokens.weight", table), weight("model.layers.0.mlp.weight", layer)
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 3]))
    gather = ir.Node("", "Gather", [table_v, ids], name="embed")
    hidden = ir.Node("", "MatMul", [gather.outputs[0], layer_v], name="layer0")
    transpose = ir.Node("", "Transpose", [table_v], attributes=[ir.AttrInt64s("perm", [1, 0])], name="head_t")
    head = ir.Node("", "MatMul", [hidden.outputs[0], transpose.outputs[0]], name="head")
    for node, name in ((gather, "embedding"), (hidden, "hidden"), (transpose, "table_t"), (head, "logits")):
        node.outputs[0].name = name
    graph = ir.Graph([ids], [head.outputs[0]], nodes=[gather, hidden, transpose, head],
                     initializers=[table_v, layer_v], opset_imports={"": 18})
    return ir.Model(graph, ir_version=9)


def test_a_tied_heads_transpose_runs_with_the_head_not_in_the_prologue():
    rng = np.random.default_rng(0)
    table, layer = rng.standard_normal((32, 8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32)
    model = _tied_model(table, layer)
    regions = {node.name: region for node, region in assign_regions(model.graph).items()}
    # the Transpose reads only the table (a prologue weight by its name) but only the head reads its result: run in
    # the prologue, its vocab x hidden output would be held across every layer's region, once per window
    assert regions == {"embed": PROLOGUE, "layer0": 0, "head_t": 0, "head": 0}
    runner = RegionRunner(model)
    assert [v.name for v in runner._inputs[0]] == ["embedding"]  # what crosses: the hidden state, not the table
    ids = np.array([[3, 1, 30]], dtype=np.int64)
    (out,) = runner.run([{"input_ids": ids}])
    np.testing.assert_allclose(out["logits"], table[ids] @ layer @ table.T, rtol=1e-5, atol=1e-5)


def test_weight_transforms_read_by_the_prologue_stay_there():
    rng = np.random.default_rng(1)
    model = _tied_model(rng.standard_normal((32, 8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32))
    graph = model.graph
    # make the embedding read the transposed-back table: its producer chain is weight-only and read in the prologue
    back = ir.Node("", "Transpose", [graph.node("head_t").outputs[0]], attributes=[ir.AttrInt64s("perm", [1, 0])],
                   name="back")
    graph.insert_before(graph.node("embed"), back)
    graph.node("embed").replace_input_with(0, back.outputs[0])
    graph.sort()
    regions = {node.name: region for node, region in assign_regions(graph).items()}
    assert regions["head_t"] == regions["back"] == regions["embed"] == PROLOGUE and regions["head"] == 0


def test_values_held_between_regions_own_their_memory():
    # onnxruntime (>= 1.32) returns outputs as views of its OrtValues; a view held while later regions run keeps its
    # region's session arena alive (at the 1B shape: +0.13 GB per region, 2 GB by the head). What crosses is copied.
    rng = np.random.default_rng(2)
    table, layer = rng.standard_normal((32, 8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32)
    runner = RegionRunner(_tied_model(table, layer))
    held = [{"input_ids": np.array([[3, 1, 30]], dtype=np.int64)}]
    steps = runner.steps(held)
    assert next(steps) == PROLOGUE
    assert held[0]["embedding"].flags.owndata  # the prologue's session is gone; its output must not pin its arena
    np.testing.assert_array_equal(held[0]["embedding"], table[[[3, 1, 30]]])
    assert next(steps) == 0 and held[0]["logits"].flags.owndata
