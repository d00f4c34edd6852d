"""compiler/capture/reuse.py: one capture for several compiles of one source (--auto's candidates)."""

import os

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

import luffy
from luffy.compiler.capture.reuse import CaptureCache
from luffy.compiler.sources.resolve import resolve_source


def _onnx_file(path, scale: float):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [scale, scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9), path)


def test_one_capture_serves_two_precisions_and_each_compile_gets_its_own_graph(tmp_path):
    cache = CaptureCache()
    fp32 = luffy.compile("llama-tiny", output=tmp_path / "fp32", captures=cache)
    int8 = luffy.compile("llama-tiny", output=tmp_path / "int8", precision="int8", captures=cache)
    assert cache.hits == 1
    # the second compile quantized its own copy: the first's graph (and a third from the cache) stays fp32
    fp32_again = luffy.compile("llama-tiny", output=tmp_path / "fp32-again", captures=cache)
    assert cache.hits == 2
    files = lambda art: {k: v["sha256"] for k, v in art.manifest["files"].items() if k.startswith("model.onnx")}
    assert files(fp32_again) == files(fp32)
    assert int8.report["parity"]["passed"] and fp32_again.report["parity"]["passed"]
    uncached = luffy.compile("llama-tiny", output=tmp_path / "fp32-alone")
    assert files(uncached) == files(fp32)  # a cached capture compiles to the bytes a fresh one does


def test_a_changed_file_is_captured_again(tmp_path):
    path = tmp_path / "m.onnx"
    _onnx_file(path, 2.0)
    cache, made = CaptureCache(), []

    def capture():
        made.append(1)
        return luffy.compiler.capture.onnx_file.load_onnx_source(path), None

    first, _ = cache.get(resolve_source(str(path)), 20, capture)
    second, _ = cache.get(resolve_source(str(path)), 20, capture)
    assert len(made) == 1 and cache.hits == 1 and second.model is not first.model
    second.model.graph.initializers["w"].const_value = ir.tensor(np.array([9.0, 9.0], dtype=np.float32), name="w")
    third, _ = cache.get(resolve_source(str(path)), 20, capture)  # the copy's edit did not reach the cache
    assert third.model.graph.initializers["w"].const_value.numpy().tolist() == [2.0, 2.0]
    _onnx_file(path, 3.0)  # rewritten: another size or time, another key
    os.utime(path, ns=(1, 1))
    changed, _ = cache.get(resolve_source(str(path)), 20, capture)
    assert len(made) == 2 and changed.model.graph.initializers["w"].const_value.numpy().tolist() == [3.0, 3.0]
