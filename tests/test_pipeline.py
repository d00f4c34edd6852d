"""The pipeline plumbing: explicit lists per level, --disable-pass/--enable-pass, per-pass records."""

import numpy as np
import onnx
import pytest
from onnx import helper

import luffy
from luffy.passes.pipelines import all_pass_names, pipeline, plugin_steps, stages

from .graphs import onnx_model


def test_levels_are_explicit_lists():
    assert pipeline("ort", 0) == []
    names = [s.name for s in pipeline("ort", 1)]
    assert names[0] == "inline" and names[-1] == "topological-sort"
    assert all(step.why for step in pipeline("ort", 2))
    assert [s.name for s in pipeline("ort", 1, disabled=["cse"])] == [n for n in names if n != "cse"]
    assert [s.name for s in pipeline("ort", 0, enabled=["cse"])] == ["cse"]
    assert set(all_pass_names()) >= set(names)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target="tpu", opt_level=2), "unknown target 'tpu'"),
    (dict(target="ort", opt_level=7), "opt level 7"),
    (dict(target="ort", opt_level=3), r"choose 0, 1 or 2 \(-O3 ran the -O2 passes and was removed\)"),
    (dict(target="ort", opt_level=2, disabled=["fuse-everything"]), "unknown pass 'fuse-everything'"),
])
def test_bad_pipeline_requests(kwargs, message):
    with pytest.raises(luffy.UsageError, match=message):
        pipeline(**kwargs)


def test_stages_list_level_target_and_precision_in_order():
    plugins = plugin_steps("trt", 2, (10, 8))
    seen = []
    plan = stages("trt", 2, "int4", target_steps=plugins, weights=lambda model: seen.append(model))
    assert [(s.name, s.numeric_check) for s in plan] == [("opt-level", True), ("target", True), ("precision", False),
                                                         ("kv-cache", False)]
    assert plan[0].steps(None) == pipeline("trt", 2)
    assert plan[1].steps(None) == plugins
    # the precision passes are built from the graph the earlier stages left (GPTQ calibrates on it)
    assert [s.name for s in plan[2].steps("fused graph")] == ["quantize-weights", "remove-unused-after-precision"]
    assert seen == ["fused graph"]
    assert stages("ort", 2, "fp32")[2].steps("fused graph") == []
    assert plan[3].steps("quantized graph") == []  # the KV cache as the compute keeps it
    ranges = []
    plan = stages("ort", 2, "int4", kv_cache="int8", kv_ranges=lambda model: ranges.append(model))
    assert [s.name for s in plan[3].steps("quantized graph")] == ["kv-cache-dtype"]
    assert ranges == ["quantized graph"]  # calibrated on the graph that will run, quantized weights and all


def test_stages_refuse_before_capture():
    with pytest.raises(luffy.UsageError, match="int8-dynamic is an ONNX Runtime mode"):
        stages("trt", 2, "int8-dynamic")
    with pytest.raises(luffy.UsageError, match="unknown pass 'fuse-nothing'"):
        stages("ort", 2, "fp32", disabled=["fuse-nothing"])


def _messy_model(path):
    """A graph with what cleanup exists for: Identity chains, a duplicated weight, a dead branch."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("MatMul", ["x1", "w_a"], ["a"]),
        helper.make_node("MatMul", ["x1", "w_b"], ["b"]),  # w_b == w_a, so a == b after dedupe + CSE
        helper.make_node("Add", ["a", "b"], ["y"]),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    io = (onnx.TensorProto.FLOAT, ["n", 4])
    onnx.save_model(onnx_model(nodes, {"x": io}, {"y": io}, {"w_a": w, "w_b": w.copy()}, name="messy"), path)
    return w


def test_cleanup_rewrites_are_counted_and_keep_outputs(tmp_path):
    w = _messy_model(tmp_path / "messy.onnx")
    raw = luffy.compile(str(tmp_path / "messy.onnx"), output=tmp_path / "o0", opt_level=0)
    clean = luffy.compile(str(tmp_path / "messy.onnx"), output=tmp_path / "o1", opt_level=1)
    assert raw.report["op_histogram"] == {"MatMul": 2, "Identity": 1, "Add": 1, "Relu": 1}
    assert clean.report["op_histogram"] == {"MatMul": 1, "Add": 1}
    assert clean.report["parameters"] == 16  # the duplicate weight is stored once
    records = {r["name"]: r for r in clean.report["passes"]}
    assert records["eliminate-identity"]["modified"] and records["dedupe-initializers"]["modified"]
    assert records["cse"]["nodes_after"] < records["cse"]["nodes_before"]
    assert clean.report["nodes"] == records["topological-sort"]["nodes_after"] == 2
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for artifact in (raw, clean):
        np.testing.assert_allclose(artifact.load().run({"x": x})["y"], 2 * x @ w, rtol=1e-5, atol=1e-6)


def test_disabled_pass_does_not_run(tmp_path):
    _messy_model(tmp_path / "messy.onnx")
    art = luffy.compile(str(tmp_path / "messy.onnx"), output=tmp_path / "o", opt_level=1, disable_pass=["eliminate-identity"])
    assert "eliminate-identity" not in [r["name"] for r in art.report["passes"]]
    assert art.manifest["options"]["disabled_passes"] == ["eliminate-identity"]
