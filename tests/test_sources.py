"""The other source forms: an existing .onnx file (with external data), package.module:factory, and nn.Module."""

import os

import numpy as np
import onnx
import pytest

import luffy
from luffy.errors import SourceError


def test_onnx_decoder_with_external_data_compiles_and_generates(zoo_artifacts, tmp_path):
    artifact, _ = zoo_artifacts("llama-tiny")
    # an ONNX decoder as another tool would hand it over: external data beside it, a tokenizer beside it
    exported = luffy.compile("llama-tiny", output=tmp_path / "ext", external_data="always", opt_level=0, check_parity=False)
    src = exported.path / "model.onnx"
    compiled = luffy.compile(str(src), output=tmp_path / "from-onnx")
    m = compiled.manifest
    assert m["source"]["kind"] == "onnx" and m["kind"] == "causal-lm"
    assert m["kv_cache"]["num_layers"] == 2 and m["max_seq_len"] == 2048
    assert m["tokenizer"] == "tokenizer.json"
    assert compiled.report["parity"] is None  # no PyTorch to compare with; said so in the report
    prompt = [[256, 10, 11, 12]]
    want = artifact.load().generate(prompt, max_new_tokens=16, eos_token_id=None)
    got = compiled.load().generate(prompt, max_new_tokens=16, eos_token_id=None)
    assert got.tolist() == want.tolist()


def _model_with_external_location(tmp_path, location: str):
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    # rewrite the location the way a hostile file would
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(proto, path)
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_escaping_the_directory_is_refused(tmp_path, location):
    path = _model_with_external_location(tmp_path, location)
    with pytest.raises(SourceError, match=r"initializer 'w' external data location .* inside the model's directory"):
        luffy.compile(str(path), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_external_data_through_a_symlink_is_refused(tmp_path):
    path = _model_with_external_location(tmp_path, "link.bin")
    os.symlink(tmp_path / "w.bin", tmp_path / "link.bin")
    with pytest.raises(SourceError, match="symbolic link"):
        luffy.compile(str(path), output=tmp_path / "out")


def test_plain_onnx_graph_runs(tmp_path):
    path = _model_with_external_location(tmp_path, "w.bin")
    assert onnx.load(path, load_external_data=False).ir_version > 13  # newer than onnxruntime 1.31 reads
    engine = luffy.compile(str(path), output=tmp_path / "out").load()
    # lowered to what opset 20 needs, so the installed onnxruntime loads it
    assert onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).ir_version == 9
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    y = engine.run({"x": x})["y"]
    np.testing.assert_allclose(y, x @ np.ones((64, 64), np.float32), rtol=1e-5, atol=1e-5)
    with pytest.raises(luffy.UsageError, match="missing inputs \\['x'\\]"):
        engine.run({})
    with pytest.raises(luffy.UsageError, match="needs a causal-LM artifact"):
        engine.generate([[1]], max_new_tokens=1)


def test_factory_source(tmp_path):
    import torch

    from luffy.tests.factories import mlp

    artifact = luffy.compile("luffy.tests.factories:mlp", output=tmp_path / "mlp")
    assert artifact.manifest["source"]["kind"] == "factory" and artifact.report["parity"]["passed"]
    module, _ = mlp()
    x = torch.randn(5, 16)  # a batch size other than the example's: dims were captured as dynamic
    (name,) = [i["name"] for i in artifact.manifest["io"]["inputs"]]
    got = artifact.load().run({name: x.numpy()})
    with torch.no_grad():
        want = module(x).numpy()
    assert np.abs(next(iter(got.values())) - want).max() <= 1e-5


@pytest.mark.parametrize("spec, message", [
    ("luffy.tests.no_such_module:f", "cannot import"),
    ("luffy.tests.factories:missing", "has no callable missing"),
])
def test_bad_factories(tmp_path, spec, message):
    with pytest.raises(SourceError, match=message):
        luffy.compile(spec, output=tmp_path / "x")


def test_in_memory_module_needs_example_inputs(tmp_path):
    import torch

    with pytest.raises(SourceError, match="example inputs are needed"):
        luffy.compile(torch.nn.Linear(2, 2), output=tmp_path / "x")
