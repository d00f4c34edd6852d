"""The compile report's liveness-based activation estimate."""

import onnx
from onnx import helper, numpy_helper
import numpy as np

from luffy.compiler.report.memory import infer, peak_activation


def test_peak_follows_liveness_exactly(tmp_path):
    # x[batch, 8] -> MatMul(8x32) -> Relu -> MatMul(32x4) -> y: the MatMul output lives until Relu has run,
    # so the peak is at Relu: two [batch, 32] float tensors.
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.ones((8, 32), np.float32), "w1"), numpy_helper.from_array(np.ones((32, 4), np.float32), "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9), tmp_path / "m.onnx")
    result = peak_activation(infer(tmp_path / "m.onnx"), {"batch": 5})
    assert result == {"peak_activation_bytes": 2 * 5 * 32 * 4, "at_node": "relu", "values_of_unknown_size": 0}


def test_decoder_report(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    memory = artifact.report["memory"]
    assert memory["kv_cache_bytes_per_token"] == artifact.manifest["kv_cache"]["bytes_per_token"] == 512
    prefill, decode = memory["prefill"], memory["decode"]
    assert prefill["tokens"] == decode["past_tokens"] == 128
    # a 128-token prefill holds at least the MLP's [128, 176] activations; one decode step far less
    assert prefill["peak_activation_bytes"] >= 128 * 176 * 4 > decode["peak_activation_bytes"] > 0
    assert prefill["values_of_unknown_size"] <= 2  # only the kept-logits slice, sized by a runtime input
    assert artifact.report["memory"] == artifact.load().manifest["report"]["memory"]


def test_memory_report_reads_external_constants_beside_the_model(tmp_path):
    # int8-dynamic's per-channel scales feed shape arithmetic; with every weight in model.onnx.data the
    # report must find them beside the model, not in the working directory.
    import luffy

    art = luffy.compile("llama-tiny", output=tmp_path / "q", precision="int8-dynamic", external_data="always")
    assert art.manifest["external_data"] == "model.onnx.data"
    decode = art.report["memory"]["decode"]
    assert decode["peak_activation_bytes"] > 0 and decode["past_tokens"] == 128
