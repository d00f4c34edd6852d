"""--target trt up to the builder, on the CPU: legalized graphs at parity on ORT, the operator check,
profiles, the deferred artifact, the manifest checks. The build and the engine run only where TensorRT's
builder and an NVIDIA GPU are present; those tests are skipped with the reason elsewhere. Nothing here
fakes TensorRT."""

from __future__ import annotations

import json
import shlex

import numpy as np
import onnx_ir as ir
import pytest

import luffy
from luffy.runtimes.trt import gpu_info, installed_tensorrt
from luffy.compiler.targets.trt_profiles import optimization_profiles
from luffy.compiler.targets.trt_support import check_graph, operator_list, require_supported
from luffy.errors import ArtifactError, BackendUnavailableError, UnsupportedModelError, UsageError
from luffy.runtimes.trt import check_engine

from .helpers import assert_greedy_like_pytorch, hf_greedy, luffy_cli

TRT = installed_tensorrt()
HAVE_BUILDER = TRT is not None and hasattr(TRT, "Builder") and gpu_info() is not None
needs_builder = pytest.mark.skipif(not HAVE_BUILDER, reason="needs TensorRT's builder (the full tensorrt package) "
                                   "and an NVIDIA GPU; PyPI's tensorrt needs NVIDIA's index, unreachable here")


@pytest.fixture(scope="module")
def deferred(tmp_path_factory):
    """llama-tiny compiled for the newest TensorRT luffy knows, build deferred."""
    return luffy.compile("llama-tiny", target="trt", output=tmp_path_factory.mktemp("trt") / "llama",
                         defer_build=True, max_batch=4, opt_seq_len=64)


def test_deferred_artifact_is_standard_onnx_at_parity(deferred):
    manifest = deferred.manifest
    assert manifest["state"] == "needs-build" and manifest["target"] == "trt"
    ops = deferred.report["op_histogram"]
    assert not [op for op in ops if "::" in op]  # no com.microsoft (or any non-standard) op
    assert ops["Attention"] == 2 and ops["RMSNormalization"] == 5 and ops["RotaryEmbedding"] == 4
    assert manifest["opset_imports"] == {"ai.onnx": 23}
    parity = deferred.report["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4
    check = manifest["tensorrt"]["operator_check"]
    assert check["supported"] and check["nodes_checked"] == deferred.report["nodes"]
    assert check["source"]["repo"] == "onnx/onnx-tensorrt"
    assert deferred.report["memory"]["decode"]["values_of_unknown_size"] == 0
    assert not (deferred.path / "model.engine").exists()


def test_profiles_prefill_and_decode(deferred):
    section = deferred.manifest["tensorrt"]
    prefill, decode = section["profiles"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    max_len = deferred.manifest["max_seq_len"]
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 64], "max": [4, max_len]}
    assert prefill["shapes"]["past_key_values.0.key"]["max"] == [4, 2, 0, 16]  # a prompt starts with no cache
    assert decode["shapes"]["input_ids"]["max"] == [4, 1]
    assert decode["shapes"]["past_key_values.1.value"] == {
        "min": [1, 2, 1, 16], "opt": [1, 2, max_len // 2, 16], "max": [4, 2, max_len - 1, 16]}
    assert decode["shapes"]["attention_mask"]["max"] == [4, max_len]
    assert section["options"]["max_batch"] == 4 and section["options"]["opt_seq_len"] == 64


def test_trtexec_line_matches_the_profiles(deferred):
    section = deferred.manifest["tensorrt"]
    args = shlex.split(section["trtexec"])
    assert args[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine"]
    assert "--profile=0" in args and "--profile=1" in args
    decode_max = [a for a in args if a.startswith("--maxShapes=")][1]
    assert "past_key_values.0.key:4x2x{}x16".format(deferred.manifest["max_seq_len"] - 1) in decode_max
    # TensorRT 11 is strongly typed only (the flag is a deprecated no-op there); 10 needs it
    assert ("--stronglyTyped" in args) == (int(section["options"]["trt_version"].split(".")[0]) == 10)


def test_portable_graph_generates_like_pytorch_on_ort(deferred, zoo_artifacts):
    assert_greedy_like_pytorch(deferred.load(runtime="ort"), zoo_artifacts("llama-tiny")[1])


def test_load_refuses_a_needs_build_artifact(deferred):
    with pytest.raises(ArtifactError, match="luffy build"):
        luffy.load(deferred.path)


def test_older_tensorrt_gets_the_decomposed_graph_with_the_rms_norm_plugin(tmp_path):
    # TensorRT 10.14's parser has Attention but neither RMSNormalization nor RotaryEmbedding: the graph is
    # decomposed at the highest opset it reads up to 22, with RMSNorm as luffy's plugin (tests/test_plugins.py)
    art = luffy.compile("llama-tiny", target="trt", output=tmp_path / "a", defer_build=True, trt_version="10.14")
    assert art.manifest["opset_imports"] == {"ai.onnx": 22, "luffy": 1}
    ops = art.report["op_histogram"]
    assert "RMSNormalization" not in ops and "RotaryEmbedding" not in ops and ops["luffy::RMSNorm"] == 5
    assert art.manifest["tensorrt"]["operator_check"]["operator_list"] == "10.14"
    assert art.report["parity"]["passed"]


def test_operator_check_names_every_node_an_older_parser_lacks(deferred):
    model = ir.load(deferred.path / "model.onnx")
    report = check_graph(model, "10.14")
    bad = report["unsupported"]
    assert {b["op"] for b in bad} == {"RMSNormalization", "RotaryEmbedding"} and len(bad) == 5 + 4
    assert all(b["node"] and b["reason"] == "added in TensorRT 10.15" for b in bad)
    with pytest.raises(UnsupportedModelError) as caught:
        require_supported(report, "model.onnx")
    message = str(caught.value)
    assert "\n" not in message and "TensorRT 10.14" in message and bad[0]["node"] in message
    # 10.0-10.5 read opsets up to 20 only: the graph itself is refused, once
    assert check_graph(model, "10.0")["unsupported"][0]["op"] == "opset 23"


def test_operator_check_refuses_com_microsoft_ops(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")  # the ORT target's graph: GroupQueryAttention & co
    report = check_graph(ir.load(artifact.path / "model.onnx"), "11.1")
    domains = {b["domain"] for b in report["unsupported"]}
    assert "com.microsoft" in domains and not report["supported"]
    gqa = next(b for b in report["unsupported"] if b["op"] == "GroupQueryAttention")
    assert "no TensorRT importer for domain com.microsoft" in gqa["reason"]


def test_operator_check_reads_documented_restrictions():
    # Attention with past_key (TensorRT's parser refuses the cache inputs) and an asymmetric int4 weight
    q = ir.Value(name="q", shape=ir.Shape([1, 4, 3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    past = ir.Value(name="past", shape=ir.Shape([1, 4, 2, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    attention = ir.node("Attention", [q, q, q, None, past, past], num_outputs=3, name="attn")
    w = ir.Value(name="w", shape=ir.Shape([64, 8]), type=ir.TensorType(ir.DataType.INT4),
                 const_value=ir.tensor(np.zeros((64, 8), np.int8), dtype=ir.DataType.INT4))
    scale = ir.Value(name="s", const_value=ir.tensor(np.ones((2, 8), np.float32)), shape=ir.Shape([2, 8]))
    zero = ir.Value(name="z", const_value=ir.tensor(np.ones((2, 8), np.int8), dtype=ir.DataType.INT4),
                    shape=ir.Shape([2, 8]))
    dq = ir.node("DequantizeLinear", [w, scale, zero], attributes={"axis": 0, "block_size": 32}, name="dq")
    graph = ir.Graph([q, past], [attention.outputs[0], dq.outputs[0]], nodes=[attention, dq],
                     initializers=[w, scale, zero], opset_imports={"": 23})
    bad = {b["node"]: b["reason"] for b in check_graph(ir.Model(graph, ir_version=10), "10.16")["unsupported"]}
    assert "past_key" in bad["attn"] and "x_zero_point must be zero" in bad["dq"]


def test_int4_for_tensorrt_is_qdq_and_passes_the_check(tmp_path):
    art = luffy.compile("llama-pydoc", target="trt", output=tmp_path / "q4", precision="int4", defer_build=True)
    ops = art.report["op_histogram"]
    assert ops["DequantizeLinear"] == ops["MatMul"] and "com.microsoft::MatMulNBits" not in ops
    assert art.manifest["tensorrt"]["operator_check"]["supported"]


def test_encoder_gets_one_profile(tmp_path):
    art = luffy.compile("bert-tiny", target="trt", output=tmp_path / "b", defer_build=True, max_batch=2)
    (profile,) = art.manifest["tensorrt"]["profiles"]
    assert profile["name"] == "all" and profile["shapes"]["input_ids"]["max"] == [2, art.manifest["max_seq_len"]]


def test_profile_options_are_validated(deferred):
    with pytest.raises(UsageError, match="opt-seq-len"):
        optimization_profiles(deferred.manifest, opt_seq_len=10_000)
    manifest = json.loads(json.dumps(deferred.manifest))
    manifest["io"]["inputs"][0]["shape"] = ["batch", "beams"]
    with pytest.raises(UsageError, match="'beams'"):
        optimization_profiles(manifest)
    with pytest.raises(UsageError, match="opt_batch 4 exceeds max_batch 2"):
        luffy.compile("llama-tiny", target="trt", output="never", defer_build=True, max_batch=2, opt_batch=4)
    assert operator_list("10.12")[0] == "10.6" and operator_list("12.0")[0] == operator_list("11.1")[0]


@pytest.mark.skipif(HAVE_BUILDER, reason="a TensorRT builder and GPU are present here")
def test_compile_without_a_builder_fails_fast_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    done = luffy_cli("compile", "llama-tiny", "-o", str(out), "--target", "trt")
    assert done.returncode == 8
    line = done.stderr.strip()
    assert "\n" not in line and "TensorRT" in line and "--defer-build" in line and "luffy build" in line
    assert not out.exists()


def test_cli_defer_build_and_build_without_a_builder(tmp_path):
    out = tmp_path / "trt"
    done = luffy_cli("compile", "llama-tiny", "-o", str(out), "--target", "trt", "--defer-build", "--max-batch", "2")
    assert done.returncode == 0, done.stderr
    assert "needs-build" in done.stderr and "luffy build" in " ".join(done.stderr.split())  # rich wraps lines
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "needs-build" and manifest["tensorrt"]["options"]["max_batch"] == 2
    if not HAVE_BUILDER:
        built = luffy_cli("build", str(out))
        assert built.returncode == 8 and "TensorRT" in built.stderr
        assert json.loads((out / "manifest.json").read_text()) == manifest  # untouched


def test_trt_options_need_the_trt_target(tmp_path):
    done = luffy_cli("compile", "llama-tiny", "-o", str(tmp_path / "x"), "--defer-build")
    assert done.returncode == 2 and "add --target trt" in done.stderr
    done = luffy_cli("compile", "llama-tiny", "-o", str(tmp_path / "x"), "--target", "trt", "--trt-version", "8.6")
    assert done.returncode == 2 and "TensorRT 10 and 11" in done.stderr


# -- the engine checks, before any deserialization ------------------------------------------------

def _built(tensorrt="10.16.1.11", cc="9.0", **build):
    return {"state": "ready", "tensorrt": {"engine_file": "model.engine", "build": {
        "tensorrt": tensorrt, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": cc, "cuda": "12.9",
        "hardware_compatibility": "none", "version_compatible": False, **build}}}


def test_engine_check_names_both_tensorrt_versions(tmp_path):
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.16\.1\.11, installed is 10\.15\.1"):
        check_engine(_built(), tmp_path, "10.15.1", {"compute_capability": "9.0"})
    check_engine(_built(version_compatible=True), tmp_path, "10.17.0", {"compute_capability": "9.0"})
    with pytest.raises(ArtifactError, match="TensorRT 10.x at or above it; installed is 11.1.0"):
        check_engine(_built(version_compatible=True), tmp_path, "11.1.0", {"compute_capability": "9.0"})
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        check_engine(_built(), tmp_path, None, None)


def test_engine_check_names_both_compute_capabilities(tmp_path):
    with pytest.raises(ArtifactError, match=r"compute capability 9\.0 .*this GPU \(NVIDIA A10\) is 8\.6"):
        check_engine(_built(), tmp_path, "10.16.1.11", {"name": "NVIDIA A10", "compute_capability": "8.6"})
    check_engine(_built(hardware_compatibility="ampere+"), tmp_path, "10.16.1.11", {"compute_capability": "8.6"})
    with pytest.raises(ArtifactError, match=">= 8.0"):
        check_engine(_built(hardware_compatibility="ampere+"), tmp_path, "10.16.1.11", {"compute_capability": "7.5"})
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU"):
        check_engine(_built(), tmp_path, "10.16.1.11", None)


def test_tampered_engine_is_refused_before_deserializing(deferred, tmp_path):
    # the engine is a file of the artifact like any other: read_manifest checks its sha256 first
    import shutil

    from luffy.compiler.emit.artifact import write_manifest

    copy = tmp_path / "art"
    shutil.copytree(deferred.path, copy)
    (copy / "model.engine").write_bytes(b"engine bytes")
    write_manifest(copy, dict(deferred.manifest))
    (copy / "model.engine").write_bytes(b"other bytes!")
    with pytest.raises(ArtifactError, match="model.engine: sha256"):
        luffy.load(copy, runtime="trt")


# -- on a GPU with TensorRT's builder ---------------------------------------------------------------

@needs_builder
def test_build_and_run_the_engine(deferred, tmp_path, zoo_artifacts):
    import shutil

    from luffy.compiler.targets.trt_build import build_artifact

    copy = tmp_path / "art"
    shutil.copytree(deferred.path, copy)
    cache = tmp_path / "timing.cache"
    manifest = build_artifact(copy, timing_cache=cache)
    build = manifest["tensorrt"]["build"]
    assert manifest["state"] == "ready" and build["tensorrt"] == TRT.__version__ and cache.is_file()
    _, module = zoo_artifacts("llama-tiny")
    prompt = [1, 17, 33, 5, 90]
    expected, _ = hf_greedy(module, prompt, 12)
    engine = luffy.load(copy)
    assert np.array_equal(engine.generate([prompt], max_new_tokens=12, eos_token_id=None), expected)
    reference = luffy.load(deferred.path, runtime="ort").score([prompt])
    assert np.abs(engine.score([prompt]) - reference).max() <= 1e-3  # TF32 matmuls may differ from ORT's fp32
