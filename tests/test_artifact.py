"""The artifact contract: hashes checked on load, nothing half-written, atomic replacement."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import luffy
from luffy.errors import ArtifactError, CapacityError, UsageError
from luffy.runtimes.ort_compat import check_onnxruntime


@pytest.fixture()
def llama_copy(zoo_artifacts, tmp_path):
    artifact, _ = zoo_artifacts("llama-tiny")
    target = tmp_path / "copy"
    shutil.copytree(artifact.path, target)
    return target


def test_manifest_records_the_contract(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    m = json.loads((artifact.path / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["state"] == "ready" and m["target"] == "ort"
    assert m["precision"] == "fp32" and m["opt_level"] == 2
    assert {"luffy", "torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["source"] == {"kind": "zoo", "spec": "llama-tiny", "architecture": "LlamaForCausalLM"}
    names = [i["name"] for i in m["io"]["inputs"]]
    # -O2's pack-qkv rotates inside GroupQueryAttention by KV buffer index: no position_ids input
    assert names[:2] == ["input_ids", "attention_mask"]
    # -O2's fuse-gqa: capacity-sized KV buffers bound as past and present, lengths as inputs
    assert names[2:6] == [f"past_key_values.{l}.{k}" for l in range(2) for k in ("key", "value")]
    # + query_seqlens (several rows of several tokens per step) and keep-last-logits
    assert names[6:] == ["seqlens_k", "total_sequence_length", "query_seqlens", "logits_indices"]
    assert m["io"]["inputs"][2]["shape"] == ["batch", 2, "max_seq", 16]
    assert m["io"]["inputs"][6] == {"name": "seqlens_k", "dtype": "int32", "shape": ["batch"]}
    assert m["io"]["outputs"][1]["shape"] == ["batch", 2, "max_seq", 16]
    assert m["dims"]["max_seq"] == {"min": 1, "max": 512} and m["max_seq_len"] == 512
    assert m["kv_cache"]["mode"] == "shared-buffer" and m["kv_cache"]["positions"] == "buffer"
    assert m["kv_cache"]["num_layers"] == 2 and m["kv_cache"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert set(m["files"]) == {"model.onnx", "tokenizer.json"}
    for info in m["files"].values():
        assert len(info["sha256"]) == 64 and info["size"] > 0
    report = m["report"]
    assert [p["name"] for p in report["passes"]][0] == "inline"
    assert all({"seconds", "modified", "nodes_before", "nodes_after"} <= set(p) for p in report["passes"])
    assert report["parity"]["max_abs_diff"] <= 1e-4


def test_tampered_file_is_refused(llama_copy):
    model = llama_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256 .* does not match"):
        luffy.load(llama_copy)


def test_truncated_and_missing_files_are_refused(llama_copy):
    (llama_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: size \d+ does not match"):
        luffy.load(llama_copy)
    (llama_copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        luffy.load(llama_copy)


def test_manifest_problems_are_refused(llama_copy):
    manifest = json.loads((llama_copy / "manifest.json").read_text())
    (llama_copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99"):
        luffy.load(llama_copy)
    (llama_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        luffy.load(llama_copy)
    (llama_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        luffy.load(llama_copy)


@pytest.mark.parametrize("pad", [[], [0], None])
def test_generation_ids_as_lists_or_null_pad_like_an_id(llama_copy, pad):
    # the schema lets a token-id field be an id, a list of them, or null (found by tests/fuzz.py: [] raised a
    # TypeError in generate); padding takes the first id, else the first EOS
    manifest = json.loads((llama_copy / "manifest.json").read_text())
    expected = luffy.load(llama_copy).generate([[256, 1, 2], [256]], max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    manifest["generation"]["pad_token_id"] = pad
    manifest["generation"]["eos_token_id"] = [0]  # the default pad when the manifest names none
    (llama_copy / "manifest.json").write_text(json.dumps(manifest))
    got = luffy.load(llama_copy).generate([[256, 1, 2], [256]], max_new_tokens=3, eos_token_id=None)
    np.testing.assert_array_equal(got, expected)


def test_manifest_entry_escaping_the_artifact_is_refused(llama_copy):
    manifest = json.loads((llama_copy / "manifest.json").read_text())
    manifest["files"]["../outside"] = {"sha256": "0" * 64, "size": 1}
    (llama_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="points outside the artifact"):
        luffy.load(llama_copy)


def test_onnxruntime_is_asked_whether_it_runs_the_opsets(tmp_path):
    # The installed onnxruntime answers, not a table: opsets 24-26 load on ORT 1.32, a future opset does not.
    import onnxruntime

    for opset in (17, 23, 24, 25, 26):
        check_onnxruntime({"opset_imports": {"ai.onnx": opset}}, tmp_path)
    with pytest.raises(ArtifactError, match=rf"onnxruntime {onnxruntime.__version__} cannot run this artifact: it uses "
                                            r"ai.onnx opset 40; this onnxruntime supports up to \d+"):
        check_onnxruntime({"opset_imports": {"ai.onnx": 40}}, tmp_path)
    with pytest.raises(ArtifactError, match=r"IR version 99; this onnxruntime reads up to \d+"):
        check_onnxruntime({"opset_imports": {"ai.onnx": 17}, "ir_version": 99}, tmp_path)


def test_compile_refuses_a_graph_the_installed_onnxruntime_cannot_run(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "future",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 40)], ir_version=10)
    onnx.save(model, tmp_path / "future.onnx")
    with pytest.raises(luffy.UnsupportedModelError, match="cannot run the compiled graph: it uses ai.onnx opset 40"):
        luffy.compile(tmp_path / "future.onnx", output=tmp_path / "out", opt_level=0)
    assert not (tmp_path / "out").exists()


def test_a_one_node_graph_at_opset_24_to_26_compiles_loads_and_runs(tmp_path):
    from onnx import TensorProto, helper

    x = np.array([1.0, -2.0], dtype=np.float32)
    for opset in (24, 25, 26):
        graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), tmp_path / f"{opset}.onnx")
        artifact = luffy.compile(tmp_path / f"{opset}.onnx", output=tmp_path / f"art{opset}", opt_level=2)
        assert artifact.manifest["opset_imports"]["ai.onnx"] == opset
        np.testing.assert_array_equal(luffy.load(artifact.path).run({"x": x})["y"], 2 * x)


def test_capacity_error_names_both_numbers(tmp_path):
    engine = luffy.compile("llama-tiny", output=tmp_path / "short", max_seq_len=64, check_parity=False).load()
    assert engine.manifest["dims"]["total"]["max"] == 64
    with pytest.raises(CapacityError, match=r"prompt length 60 \+ max_new_tokens 10 = 70 exceeds .* maximum sequence length 64"):
        engine.generate([list(range(60))], max_new_tokens=10)
    assert engine.generate([list(range(60))], max_new_tokens=4).shape == (1, 64)


def test_max_seq_len_beyond_the_model_is_refused(tmp_path):
    with pytest.raises(UsageError, match="--max-seq-len 4096 exceeds the model's position limit 512"):
        luffy.compile("gpt2-tiny", output=tmp_path / "a", max_seq_len=4096)
    assert not (tmp_path / "a").exists()


def test_external_data_artifact_loads_and_matches(zoo_artifacts, tmp_path):
    artifact, _ = zoo_artifacts("llama-tiny")
    ext = luffy.compile("llama-tiny", output=tmp_path / "ext", external_data="always")
    assert ext.manifest["external_data"] == "model.onnx.data"
    assert set(ext.manifest["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000
    prompt = [[256, 5, 6, 7]]
    a = artifact.load().generate(prompt, max_new_tokens=8, min_new_tokens=8)
    b = ext.load().generate(prompt, max_new_tokens=8, min_new_tokens=8)
    assert a.tolist() == b.tolist()


def test_refuses_to_overwrite_a_directory_that_is_not_an_artifact(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="is not a luffy artifact; refusing to overwrite"):
        luffy.compile("gpt2-tiny", output=precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_recompile_replaces_an_artifact_atomically(tmp_path):
    out = tmp_path / "art"
    first = luffy.compile("gpt2-tiny", output=out, opt_level=0, check_parity=False)
    second = luffy.compile("gpt2-tiny", output=out, opt_level=1, check_parity=False)
    assert first.manifest["opt_level"] == 0 and luffy.load(out).manifest["opt_level"] == 1 == second.manifest["opt_level"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging or backup directories left


def test_failed_compile_leaves_nothing(tmp_path):
    with pytest.raises(luffy.SourceError, match="factory returned int"):
        luffy.compile("luffy.tests.factories:not_a_module", output=tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


# The child stops inside the staged write, at the parity check, the way a big model's compile spends
# minutes there: the parent's signal then always lands mid-compile. (Racing a tiny model's compile, whose
# write phase takes ~0.1 s, let the signal arrive after the process had exited on a loaded machine.)
_CHILD = """
import pathlib, signal, sys, time
import luffy

# A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt
# handler; restore it, so the child reacts to Ctrl-C as an interactive compile does.
signal.signal(signal.SIGINT, signal.default_int_handler)

def progress(message):
    if message.startswith("checking parity"):
        pathlib.Path(sys.argv[2]).touch()
        time.sleep(120)

luffy.compile("llama-tiny", output=sys.argv[1], progress=progress)
"""


def _compile_process(out: Path, marker: Path):
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(marker)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_for_staging(parent: Path, proc, marker: Path, timeout=120.0) -> list[Path]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        staged = [p for p in parent.iterdir() if p.name.startswith(".art.partial-")]
        if marker.exists() and staged and any(staged[0].iterdir()):
            return staged
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    raise AssertionError("compile never started writing")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_compile_leaves_no_loadable_directory(tmp_path, how):
    out, marker = tmp_path / "art", tmp_path.parent / f"{tmp_path.name}.writing"
    proc = _compile_process(out, marker)
    _wait_for_staging(tmp_path, proc, marker)
    os.kill(proc.pid, how)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    with pytest.raises(ArtifactError):
        luffy.load(out)
    leftovers = [p for p in tmp_path.iterdir()]
    for p in leftovers:  # a SIGKILL can leave the hidden staging dir behind, but never a loadable one
        with pytest.raises(ArtifactError, match="manifest.json: missing"):
            luffy.load(p)
    if how == signal.SIGINT:
        assert leftovers == []  # a Ctrl-C cleans up after itself


def test_engine_from_plain_numpy_inputs(zoo_artifacts):
    artifact, _ = zoo_artifacts("gpt2-tiny")
    engine = artifact.load()
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    streamed = []
    out = engine.generate(ids, max_new_tokens=3, min_new_tokens=3, streamer=lambda tokens: streamed.append(tokens.copy()))
    assert out.dtype == np.int64 and out.shape == (2, 6) and (out[:, :3] == ids).all()
    assert np.stack(streamed, axis=1).tolist() == out[:, 3:].tolist()  # each step's tokens, as chosen
    assert engine.score(ids).shape == (2, 3, 320)


def _rewrite_manifest(directory: Path, **changes):
    manifest = json.loads((directory / "manifest.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del manifest[key]
        else:
            manifest[key] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))


_DELETE = object()


@pytest.mark.parametrize("changes, message", [
    (dict(model_file="../outside.onnx"), r"field model_file entry '\.\./outside\.onnx' points outside the artifact"),
    (dict(model_file="/etc/passwd"), r"field model_file entry '/etc/passwd' points outside the artifact"),
    (dict(model_file="extra.onnx"), r"field model_file names 'extra\.onnx', which the file table does not list and hash"),
    (dict(kv_cache=_DELETE), r"field kv_cache is missing; a causal-lm artifact must describe its KV cache"),
    (dict(max_seq_len="512"), r"field max_seq_len must be integer or null, got str '512'"),
    (dict(max_seq_len=True), r"field max_seq_len must be integer or null, got bool"),
    (dict(kind="diffusion"), r"field kind is 'diffusion'; expected one of causal-lm, encoder, module"),
    (dict(files={"model.onnx": {"sha256": "x"}}), r"field files\.model\.onnx\.size is missing"),
    (dict(tokenizer=7), r"field tokenizer must be string or null, got int 7"),
])
def test_manifest_schema_errors_are_one_line(llama_copy, changes, message):
    (llama_copy / "extra.onnx").write_bytes((llama_copy / "model.onnx").read_bytes())  # present, but unhashed
    _rewrite_manifest(llama_copy, **changes)
    with pytest.raises(ArtifactError, match=r"manifest\.json: " + message) as caught:
        luffy.load(llama_copy)
    assert "\n" not in str(caught.value)


def test_token_ids_outside_the_vocabulary_are_usage_errors(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    engine = artifact.load()
    for bad in (-1, 320, 10**23):
        with pytest.raises(UsageError, match=rf"token id {bad} \(row 0, position 1\) is outside the vocabulary of size 320"):
            engine.generate([[256, bad, 3]], max_new_tokens=2)
    with pytest.raises(UsageError, match=r"token id -5 is outside the vocabulary of size 320"):
        engine.score(np.array([[1, -5]]), attention_mask=np.ones((1, 2), np.int64))
    with pytest.raises(UsageError, match=r"token id 999 \(row 1, position 0\)"):
        engine.score([[1, 2], [999]])


def test_the_next_compile_removes_what_a_killed_one_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names a process that no longer exists
    leftover = tmp_path / f".art.partial-{dead.pid}-abc123"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"\0" * 1024)
    alive = tmp_path / f".art.partial-{os.getpid()}-def456"  # a compile still running: not ours to remove
    alive.mkdir()
    luffy.compile("llama-tiny", output=tmp_path / "art", opt_level=0, check_parity=False)
    assert not leftover.exists() and alive.exists()


def test_artifacts_follow_the_umask_so_other_users_can_read_them(tmp_path):
    previous = os.umask(0o022)
    try:
        art = luffy.compile("llama-tiny", output=tmp_path / "art", opt_level=0, check_parity=False)
    finally:
        os.umask(previous)
    assert (art.path.stat().st_mode & 0o777) == 0o755
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in art.path.iterdir())


def test_engines_share_one_preamble_and_refuse_unknown_options(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    with pytest.raises(UsageError, match=r"runtime='ort'\) has no option thread \(it takes: threads, providers"):
        luffy.load(artifact.path, thread=2)
    with pytest.raises(UsageError, match=r"runtime='trt'\) has no option threads \(it takes: none\)"):
        luffy.load(artifact.path, runtime="trt", threads=2)
    engine = artifact.load()
    assert engine.vocab == 320 == engine.graph.vocab  # the manifest's I/O and the graph agree
    assert engine._pad_id(None) == 258 and engine._pad_id(7) == 7  # the model's pad id, else the caller's
