"""The other source forms: an existing .onnx file (with external data), package.module:factory, and nn.Module."""

import os

import numpy as np
import onnx
import pytest
from onnx import helper

import luffy
from luffy.errors import SourceError

from .graphs import onnx_model


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
    io = (onnx.TensorProto.FLOAT, [1, 64])
    model = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": io}, {"y": io},
                       {"w": np.ones((64, 64), np.float32)}, name="g", ir_version=None)
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


# -- sources that must be refused, not compiled into something else ------------------------------------

def _tiny_llama_dir(directory):
    from .helpers import COMMON, make_hf_dir

    make_hf_dir("llama", dict(COMMON), directory)
    return directory


def _edit_checkpoint(directory, drop=(), add=None):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_missing_a_tensor_is_refused(tmp_path):
    # transformers would initialize the tensor at random, and parity would compare that model with itself
    hf = _tiny_llama_dir(tmp_path / "hf")
    _edit_checkpoint(hf, drop=["model.layers.1.mlp.down_proj.weight"])
    with pytest.raises(SourceError, match=r"checkpoint tensors missing: model\.layers\.1\.mlp\.down_proj\.weight; "
                                          r"the weights do not match config\.json"):
        luffy.compile(hf, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_tensors_the_config_does_not_have_is_refused(tmp_path):
    # e.g. a checkpoint with one layer more than config.json: a causal LM is the whole model, nothing may be dropped
    from .helpers import LAYERS

    hf = _tiny_llama_dir(tmp_path / "hf")
    _edit_checkpoint(hf, add={f"model.layers.{LAYERS}.mlp.down_proj.weight": np.zeros((64, 128), np.float32)})
    with pytest.raises(SourceError, match=rf"checkpoint tensors not in the model: model\.layers\.{LAYERS}\.mlp\.down_proj"):
        luffy.compile(hf, output=tmp_path / "out")


def test_an_encoders_task_head_in_the_checkpoint_is_ignored_and_reported():
    from luffy.compiler.sources.resolve import ENCODER
    from luffy.compiler.sources.torch_model import require_complete_weights
    from luffy.models_zoo import ZOO

    bert = ZOO["bert-tiny"].build_model()  # BertModel: children embeddings, encoder, pooler
    loading = {"missing_keys": [], "unexpected_keys": ["cls.predictions.bias", "bert.encoder.layer.9.output.dense.weight"]}
    with pytest.raises(SourceError, match=r"not in the model: bert\.encoder\.layer\.9"):
        require_complete_weights("hf", bert, loading, ENCODER)
    loading["unexpected_keys"] = ["cls.predictions.bias"]
    assert require_complete_weights("hf", bert, loading, ENCODER) == ["cls.predictions.bias"]


def test_factory_that_fails_when_called_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match=r"os:system: calling system\(\) failed \(TypeError: "):
        luffy.compile("os:system", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_and_node_less_onnx_files_are_refused(tmp_path):
    from onnx import TensorProto, helper

    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(SourceError, match=r"empty\.onnx: empty file, not an ONNX model"):
        luffy.compile(tmp_path / "empty.onnx", output=tmp_path / "a")
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    hollow = helper.make_model(helper.make_graph([], "hollow", [value], [value]))
    onnx.save(hollow, tmp_path / "hollow.onnx")
    with pytest.raises(SourceError, match=r"hollow\.onnx: graph has no nodes"):
        luffy.compile(tmp_path / "hollow.onnx", output=tmp_path / "b")
    (tmp_path / "text.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(SourceError, match=r"text\.onnx: "):
        luffy.compile(tmp_path / "text.onnx", output=tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.onnx", "hollow.onnx", "text.onnx"]


def test_a_tokenizer_the_runtime_cannot_read_is_refused_at_compile(tmp_path):
    hf = _tiny_llama_dir(tmp_path / "hf")
    (hf / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"')  # truncated
    with pytest.raises(SourceError, match=r"tokenizer\.json: the tokenizers library cannot read it"):
        luffy.compile(hf, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_fails_before_capture(tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    said = []
    with pytest.raises(luffy.UsageError, match=r"cannot create the output's parent directory"):
        luffy.compile("llama-tiny", output=tmp_path / "file" / "out", progress=said.append)
    assert said == []  # nothing was captured first
