"""The `luffy` command as a user runs it: real processes, exit codes, one-line errors."""

import json
import os
import signal
import shutil
import subprocess
import sys
import time

import pytest

from luffy.tests.helpers import error_line, luffy_cli
from luffy.errors import ArtifactError, CapacityError, SourceError, UnsupportedModelError, UsageError


def assert_one_line_error(proc, exit_code, *fragments):
    assert proc.returncode == exit_code, proc.stderr
    line = error_line(proc.stderr)  # one error line, no traceback
    for fragment in fragments:
        assert fragment in line


def test_compile_run_inspect_end_to_end(tmp_path):
    out = tmp_path / "llama"
    compiled = luffy_cli("compile", "llama-tiny", "-o", out, "--target", "ort", "-O2", "--json", check=True)
    report = json.loads(compiled.stdout)
    assert report["parity"]["passed"] and report["nodes"] > 0

    ran = luffy_cli("run", out, "--input-ids", "256,72,105", "--max-new-tokens", "6", "--no-eos", "--json", check=True)
    result = json.loads(ran.stdout)
    assert result["input_ids"] == [256, 72, 105] and len(result["output_ids"]) == 6
    import luffy

    expected = luffy.load(out).generate([[256, 72, 105]], max_new_tokens=6, eos_token_id=None)[0, 3:]
    assert result["output_ids"] == expected.tolist()

    text = luffy_cli("run", out, "--prompt", "Hi", "--max-new-tokens", "3", check=True)
    assert text.stdout.startswith("Hi")

    info = json.loads(luffy_cli("inspect", out, "--json", check=True).stdout)
    assert info["kind"] == "causal-lm" and info["kv_cache"]["num_layers"] == 2
    assert sum(info["op_histogram"].values()) == info["nodes"]
    assert info["parameters"] == report["parameters"]
    # fusion coverage: one attention per layer, and a reason wherever a rewrite never fired
    assert info["fusions"]["fuse-sdpa"] == {"matches": 2, "per_layer": 1.0}
    assert all(entry["matches"] or entry["closest_miss"] for entry in info["fusions"].values())


def test_zoo_lists_models():
    proc = luffy_cli("zoo", "--json", check=True)
    names = {e["name"] for e in json.loads(proc.stdout)}
    assert {"llama-tiny", "gpt2-tiny", "bert-tiny"} <= names


@pytest.mark.parametrize("command", [[], ["compile"], ["run"], ["inspect"], ["zoo"]])
def test_every_command_has_help_with_an_example(command):
    proc = luffy_cli(*command, "--help", check=True)
    assert "Usage:" in proc.stdout
    if command:
        assert "Example:" in proc.stdout


def test_missing_path(tmp_path):
    assert_one_line_error(luffy_cli("compile", tmp_path / "nope", "-o", tmp_path / "o"), SourceError.exit_code,
                          "no such file or directory")
    assert not (tmp_path / "o").exists()


def test_hub_id_is_refused_with_advice(tmp_path):
    proc = luffy_cli("compile", "meta-llama/Llama-3.2-1B", "-o", tmp_path / "o")
    assert_one_line_error(proc, SourceError.exit_code, "meta-llama/Llama-3.2-1B", "model hub id", "local directory")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    assert_one_line_error(luffy_cli("compile", tmp_path / "t5", "-o", tmp_path / "o"), UnsupportedModelError.exit_code,
                          "T5ForConditionalGeneration", "model_type=t5")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    assert_one_line_error(luffy_cli("compile", tmp_path / "alien", "-o", tmp_path / "o"), UnsupportedModelError.exit_code,
                          "alien/config.json")
    assert not (tmp_path / "o").exists()


def test_corrupt_artifact(tmp_path, zoo_artifacts):
    artifact, _ = zoo_artifacts("gpt2-tiny")
    copy = tmp_path / "copy"
    shutil.copytree(artifact.path, copy)
    (copy / "model.onnx").write_bytes(b"\0" * (copy / "model.onnx").stat().st_size)
    assert_one_line_error(luffy_cli("run", copy, "--input-ids", "1,2"), ArtifactError.exit_code, "model.onnx", "sha256")
    assert_one_line_error(luffy_cli("inspect", copy), ArtifactError.exit_code, "model.onnx")
    assert_one_line_error(luffy_cli("run", tmp_path, "--input-ids", "1"), ArtifactError.exit_code, "manifest.json: missing")


def test_capacity_and_usage_errors(zoo_artifacts):
    artifact, _ = zoo_artifacts("gpt2-tiny")
    ids = ",".join(["1"] * 500)
    assert_one_line_error(luffy_cli("run", artifact.path, "--input-ids", ids, "--max-new-tokens", "20"),
                          CapacityError.exit_code, "500", "512")
    assert_one_line_error(luffy_cli("run", artifact.path, "--input-ids", "1,x"), UsageError.exit_code, "1,x")
    assert_one_line_error(luffy_cli("run", artifact.path), UsageError.exit_code, "--prompt")
    assert_one_line_error(luffy_cli("compile", "llama-tiny", "-o", "x", "--precision", "int3"), UsageError.exit_code, "int3")
    assert_one_line_error(luffy_cli("compile", "llama-tiny", "-o", "x", "--disable-pass", "nope"), UsageError.exit_code,
                          "unknown pass 'nope'")


def test_debug_shows_the_traceback(tmp_path):
    proc = luffy_cli("--debug", "compile", tmp_path / "nope", "-o", tmp_path / "o")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# -- exit codes come from what the user sees, whatever click or typer version is installed ---------------

@pytest.mark.parametrize("args, fragment", [
    ([], "Usage:"),                                                     # bare `luffy`: the help, as a usage error
    (["--bogus"], "No such option: --bogus"),
    (["compile", "llama-tiny", "-o", "x", "-O", "7"], "'-O'"),
    (["run", "build", "--max-new-tokens", "-1"], "'--max-new-tokens'"),
    (["compile"], "Missing argument"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_exit_2_with_the_parsers_message(args, fragment):
    proc = luffy_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert fragment in proc.stdout + proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_short_and_long_help(flag):
    for command in ([], ["compile"], ["run"]):
        proc = luffy_cli(*command, flag, check=True)
        assert "Usage:" in proc.stdout


def test_token_ids_outside_the_vocabulary_exit_2(zoo_artifacts):
    artifact, _ = zoo_artifacts("gpt2-tiny")
    for ids in ("1,-1", "1,320", "1,100000000000000000000000"):
        assert_one_line_error(luffy_cli("run", artifact.path, "--input-ids", ids), UsageError.exit_code,
                              "outside the vocabulary of size 320")
    assert_one_line_error(luffy_cli("run", artifact.path, "--input-ids", "1,1e23"), UsageError.exit_code, "1e23")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signalled_compile_says_so_exits_128_plus_n_and_leaves_nothing(tmp_path, sig, code, word):
    # The factory's eager forward (the parity check, inside the staged write) pauses after creating the marker,
    # so the signal lands while the artifact's files are half written.
    marker = tmp_path / "writing"
    env = {**os.environ, "LUFFY_TEST_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "luffy", "compile", "luffy.tests.factories:pausing_mlp", "-o",
                             tmp_path / "art"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.partial-")]  # mid-write
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert error_line(stderr) == f"luffy: error: {word} ({'Ctrl-C' if code == 130 else 'SIGTERM'})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing"]  # no artifact, no staging directory


def test_run_escapes_control_bytes_a_model_generates():
    from luffy.cli.console import printable

    assert printable("def f():\n\treturn 1\x1b[2J\x07\u202e") == "def f():\n\treturn 1\\x1b[2J\\x07\\u202e"
    assert printable("naïve – 日本語 🙂") == "naïve – 日本語 🙂"


def test_every_config_option_is_a_compile_flag_and_a_manifest_option():
    """An option is one LuffyConfig field: its flag, default and help reach `luffy compile --help`, its value
    reaches the config, and it is recorded in the manifest's options (a group's only when that group is on)."""
    import dataclasses

    from typer.testing import CliRunner

    from luffy.cli.main import app
    from luffy.compiler.config import LuffyConfig

    help_text = " ".join(CliRunner().invoke(app, ["compile", "--help"], terminal_width=1000, max_content_width=1000).output.split())
    options = [f for f in dataclasses.fields(LuffyConfig) if "flags" in f.metadata]
    assert len(options) >= 25
    for f in options:
        flag = (f.metadata["flags"] or ("--" + f.name.replace("_", "-"),))[0].split("/")[0]
        assert flag in help_text, f.name
        assert " ".join(f.metadata["help"].split()) in help_text, f.name
    groups = {f.name: f.metadata["group"] for f in options}
    assert set(LuffyConfig().to_json()) == {name for name, group in groups.items() if group is None}
    assert set(LuffyConfig(target="trt").to_json()) == {name for name, group in groups.items() if group != "auto"}
    # a flag's value reaches LuffyConfig's own validation, which names the option
    result = luffy_cli("compile", "llama-tiny", "-o", "unused", "--block-size", "7", timeout=120)
    assert result.returncode == UsageError.exit_code and "block_size 7" in error_line(result.stderr)


def test_every_serve_option_is_a_flag_and_a_ray_serve_config_key():
    """A serve option is one field of serving/options.py: its flag and help reach `luffy serve --help`, and the
    same key in a Ray Serve config file's args (YAML, strings from `serve run k=v` too) builds the same settings
    as the flag does."""
    import yaml
    from typer.testing import CliRunner

    from luffy.cli.main import app
    from luffy.options import option_flags, option_key
    from luffy.serving.options import serve_fields, serve_options

    help_text = " ".join(CliRunner().invoke(app, ["serve", "--help"], terminal_width=1000, max_content_width=1000).output.split())
    fields = serve_fields()
    assert len(fields) >= 29  # the 27 flags of before, --header-timeout and --body-timeout
    for f, _, _ in fields:
        assert option_flags(f)[0].split("/")[0] in help_text and " ".join(f.metadata["help"].split()) in help_text
    config = yaml.safe_load("""
        applications:
          - name: luffy
            import_path: luffy.serving.ray:build_app
            args: {artifact: build/pydoc, max_num_seqs: 8, min_replicas: 1, max_replicas: 3, routing: pow2,
                   prefix_cache: false, header_timeout: 2.5, draft: build/int8, num_assistant_tokens: 3}
    """)
    args = config["applications"][0]["args"]
    from_yaml = serve_options(args)
    from_strings = serve_options({k: str(v) for k, v in args.items()})  # `serve run ... max_num_seqs=8`
    assert from_yaml == from_strings
    artifact, settings, ray = from_yaml
    assert (settings.scheduler.max_num_seqs, settings.scheduler.prefix_cache, settings.header_timeout) == (8, False, 2.5)
    assert settings.scheduler.speculation.num_tokens == 3 and str(settings.draft) == "build/int8"
    assert (ray.min_replicas, ray.max_replicas, ray.routing) == (1, 3, "pow2")
    assert serve_options({"artifact": "a"})[2] is None  # no Ray key: the single-process server
    assert {option_key(f) for f, _, _ in fields} >= set(args) - {"artifact"}
    with pytest.raises(UsageError, match="unknown serve option.*max_num_seq"):
        serve_options({"artifact": "a", "max_num_seq": 8})
    with pytest.raises(UsageError, match="max_num_seqs='many': expected int"):
        serve_options({"artifact": "a", "max_num_seqs": "many"})
