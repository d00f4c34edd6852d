"""plugins/: the registry, the RMSNorm plugin's rule (graph after, a graph it must not touch, parity on
ORT through its function), and TensorRT 10.7-10.14 artifacts that use it. Registering the TensorRT side
needs TensorRT (tensorrt.plugin) and a GPU; that test is skipped with the reason elsewhere."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import luffy
from luffy.runtimes.trt import gpu_info, installed_tensorrt
from luffy.compiler.targets.trt_support import check_graph
from luffy.passes.pipelines import plugin_steps
from luffy.passes.use_plugins import use_plugins
from luffy.plugins import PLUGINS, RMS_NORM, plugins_for_tensorrt

from .graphs import onnx_model
from .helpers import assert_greedy_like_pytorch, hf_greedy

HIDDEN = 16


def _rms_norm_graph(axis: int = -1, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """x * 1/sqrt(mean(x^2, axis) + eps) * w, as torch.onnx exports an RMSNorm at opset 20 (an fp16 one
    computes in fp32 between two Casts, like transformers' LlamaRMSNorm)."""
    scale = np.linspace(0.5, 1.5, HIDDEN).astype(helper.tensor_dtype_to_np_dtype(dtype))
    half = dtype == TensorProto.FLOAT16
    compute = TensorProto.FLOAT if half else dtype
    nodes = [
        helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT) if half else helper.make_node("Identity", ["x"], ["xc"]),
        helper.make_node("Pow", ["xc", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Add", ["ms", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["xc", "inv"], ["normed"]),
        helper.make_node("Cast", ["normed"], ["normed_t"], to=dtype) if half else helper.make_node("Identity", ["normed"], ["normed_t"]),
        helper.make_node("Mul", ["w", "normed_t"], ["y"]),
    ]
    if not half:  # the exported fp32 graph has no Identity between these nodes
        nodes = [n for n in nodes if n.op_type != "Identity"]
        for n in nodes:
            n.input[:] = [{"xc": "x", "normed_t": "normed"}.get(i, i) for i in n.input]
    inits = [
        helper.make_tensor("two", compute, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [axis]),
        helper.make_tensor("eps", compute, [], [1e-6]),
        onnx.numpy_helper.from_array(scale, "w"),
    ]
    io = (dtype, ["b", "s", HIDDEN])
    model = onnx_model(nodes, {"x": io}, {"y": io}, inits, name="rms", ir_version=10)
    if axis != -1:  # a norm over the sequence axis: w broadcasts over it instead
        model.graph.initializer[3].CopyFrom(onnx.numpy_helper.from_array(scale[:1], "w"))
    onnx.checker.check_model(model, full_check=True)
    return model


def _rewrite(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    pass_ = use_plugins([RMS_NORM])
    result = pass_(model)
    proto = ir.serde.serialize_model(result.model)
    proto.ir_version = 10  # the onnxruntime in use reads IR <= 13; compile lowers it the same way
    return proto, pass_.stats


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT's own fusions off
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_registry_is_an_explicit_list_and_registers_nothing_on_import():
    assert [p.plugin_id for p in PLUGINS] == ["luffy::RMSNorm"]
    code = "import sys, luffy.plugins; print(any(m.startswith('tensorrt') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # TensorRT is imported only when a build or an engine asks for plugins


def test_plugins_cover_the_versions_between_plugin_priority_and_the_native_op():
    assert plugins_for_tensorrt((10, 6)) == []  # 10.6 would inline the local function instead
    assert plugins_for_tensorrt((10, 7)) == [RMS_NORM] == plugins_for_tensorrt((10, 14))
    assert plugins_for_tensorrt((10, 15)) == [] == plugins_for_tensorrt((11, 1))  # RMSNormalization is native
    assert [s.name for s in plugin_steps("ort", 2, None)] == []
    assert [s.name for s in plugin_steps("trt", 0, (10, 8))] == []
    assert plugin_steps("trt", 2, (10, 8), disabled=["use-trt-plugins"]) == []


def test_function_is_a_valid_onnx_function():
    for plugin in PLUGINS:
        function = plugin.function(20)
        assert (function.domain, function.name) == (plugin.domain, plugin.name)
        onnx.checker.check_function(function, onnx.checker.C.CheckerContext())


def test_rms_norm_rule_graph_after():
    after, stats = _rewrite(_rms_norm_graph())
    ops = [(n.domain, n.op_type) for n in after.graph.node]
    assert ops == [("luffy", "RMSNorm")]
    node = after.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"luffy" and attrs["plugin_version"] == b"1"
    assert attrs["epsilon"] == pytest.approx(1e-6)
    assert [(f.domain, f.name) for f in after.functions] == [("luffy", "RMSNorm")]
    assert {o.domain: o.version for o in after.opset_import}["luffy"] == 1
    assert stats["matches"] == 1 and stats["plugins"] == {"luffy::RMSNorm": 1}
    onnx.checker.check_model(after, full_check=True)


def test_rms_norm_rule_leaves_a_norm_over_another_axis_alone():
    before = _rms_norm_graph(axis=1)
    after, stats = _rewrite(before)
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    assert not after.functions and stats["matches"] == 0
    assert stats["not_matched"] and stats["plugins"] == {}


def test_rms_norm_rule_leaves_a_double_precision_norm_alone():
    after, stats = _rewrite(_rms_norm_graph(dtype=TensorProto.DOUBLE))
    assert "RMSNorm" not in [n.op_type for n in after.graph.node] and stats["matches"] == 0


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_rms_norm_plugin_runs_at_parity_on_ort(dtype):
    before = _rms_norm_graph(dtype=dtype)
    after, stats = _rewrite(before)
    assert stats["matches"] == 1
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, HIDDEN)) * 3).astype(helper.tensor_dtype_to_np_dtype(dtype))
    expected, got = _run(before, x), _run(after, x)
    tolerance = 1e-6 if dtype == TensorProto.FLOAT else 2e-3  # fp16: the function accumulates in fp32
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=tolerance, atol=tolerance)


@pytest.fixture(scope="module")
def plugin_artifact(tmp_path_factory):
    """llama-tiny for TensorRT 10.8: RMSNorm through the plugin, everything else decomposed."""
    return luffy.compile("llama-tiny", target="trt", output=tmp_path_factory.mktemp("plugins") / "llama",
                         defer_build=True, trt_version="10.8")


def test_tensorrt_10_8_artifact_uses_the_plugin_in_every_norm(plugin_artifact):
    manifest, report = plugin_artifact.manifest, plugin_artifact.report
    layers = manifest["kv_cache"]["num_layers"]
    assert report["op_histogram"]["luffy::RMSNorm"] == 2 * layers + 1  # two per layer and the final norm
    assert "RMSNormalization" not in report["op_histogram"] and "Pow" not in report["op_histogram"]
    assert manifest["opset_imports"] == {"ai.onnx": 22, "luffy": 1}
    check = manifest["tensorrt"]["operator_check"]
    assert check["supported"] and check["plugins"] == {"luffy::RMSNorm": 2 * layers + 1}
    assert "luffy build" in manifest["tensorrt"]["next_step"] and "trtexec cannot" in manifest["tensorrt"]["next_step"]
    record = next(p for p in report["passes"] if p["name"] == "use-trt-plugins")
    assert record["matches"] == 2 * layers + 1
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= 1e-4


def test_tensorrt_10_8_artifact_generates_like_pytorch_on_ort(plugin_artifact, zoo_artifacts):
    assert_greedy_like_pytorch(plugin_artifact.load(runtime="ort"), zoo_artifacts("llama-tiny")[1])


def test_operator_check_refuses_plugins_where_tensorrt_cannot_load_them(plugin_artifact):
    model = ir.load(plugin_artifact.path / "model.onnx")
    report = check_graph(model, "10.6")
    bad = report["unsupported"]
    assert len(bad) == 5 and {b["op"] for b in bad} == {"RMSNorm"}
    assert bad[0]["reason"] == "luffy plugin luffy::RMSNorm loads on TensorRT >= 10.7"
    # newer parsers have no importer named RMSNorm, so they still fall back to the registered plugin
    assert check_graph(model, "10.16")["supported"]


def test_tensorrt_before_10_7_gets_no_plugin(tmp_path):
    art = luffy.compile("llama-tiny", target="trt", output=tmp_path / "a", defer_build=True, trt_version="10.4")
    assert art.manifest["opset_imports"] == {"ai.onnx": 20}
    assert "luffy::RMSNorm" not in art.report["op_histogram"]
    assert art.manifest["tensorrt"]["operator_check"]["plugins"] == {}
    assert "use-trt-plugins" not in [p["name"] for p in art.report["passes"]]


TRT = installed_tensorrt()


@pytest.mark.skipif(TRT is None or gpu_info() is None,
                    reason="needs TensorRT's Python package (tensorrt.plugin) and an NVIDIA GPU; PyPI's tensorrt "
                           "needs NVIDIA's index, unreachable here")
def test_tensorrt_registration_is_idempotent():
    import tensorrt.plugin as trtp

    RMS_NORM.register_tensorrt()
    RMS_NORM.register_tensorrt()
    assert trtp.op.luffy.RMSNorm is not None
    creator = TRT.get_plugin_registry().get_creator("RMSNorm", "1", "luffy")
    assert creator is not None


@pytest.mark.skipif(TRT is None or not hasattr(TRT, "Builder") or gpu_info() is None,
                    reason="needs TensorRT's builder (the full tensorrt package) and an NVIDIA GPU; PyPI's tensorrt "
                           "needs NVIDIA's index, unreachable here")
def test_plugin_artifact_builds_and_generates_like_pytorch(plugin_artifact, tmp_path, zoo_artifacts):
    import shutil

    from luffy.compiler.targets.trt_build import build_artifact

    copy = tmp_path / "art"
    shutil.copytree(plugin_artifact.path, copy)
    manifest = build_artifact(copy, timing_cache=tmp_path / "timing.cache")
    assert manifest["tensorrt"]["operator_check"]["plugins"] == {"luffy::RMSNorm": 5}
    _, module = zoo_artifacts("llama-tiny")
    prompt = [1, 17, 33, 5, 90]
    expected, _ = hf_greedy(module, prompt, 12)
    assert np.array_equal(luffy.load(copy).generate([prompt], max_new_tokens=12, eos_token_id=None), expected)
