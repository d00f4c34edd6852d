"""`luffy bench`: the API and the CLI run on a tiny model and report sane fields. No timed assertions."""

import importlib.util
import json
import os
import shutil
import time

import numpy as np
import pytest

from luffy.benchmarks import bench
from luffy.benchmarks.serve_bench import ServeLoad
from luffy.benchmarks.worker import Worker
from luffy.errors import CapacityError, UsageError
from luffy.tests.helpers import luffy_cli

BATCHES = [1, 2]
GEN_LEN = 4
STATS = ("prefill_ms", "decode_tok_s", "e2e_tok_s")
TABLE_HEADER = "| system | batch | prefill ms | decode tok/s | end-to-end tok/s | % of roofline | peak RSS MiB | compile s |"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One bench of the zoo's llama-tiny (compiled by the bench, timed) against three peers and luffy's int4 build."""
    work = tmp_path_factory.mktemp("bench")
    report = bench("llama-tiny", prompt_len=8, gen_len=GEN_LEN, batch=BATCHES, vs="torch,ort-export,genai,luffy-int4", repeats=2,
                   warmup=1, workdir=work, bandwidth_mib=32)
    return report, work


def assert_sane_stats(stats, runs):
    assert stats["n"] == runs
    assert 0 < stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]


def test_bench_api_reports_sane_fields(tiny):
    report, _ = tiny
    assert [s["name"] for s in report.systems] == ["luffy", "torch", "ort-export", "genai", "luffy-int4"]
    int4 = report.system("luffy-int4")
    assert int4["status"] == "ok" and int4["label"] == "luffy -O2 int4" and int4["build_s"] > 0
    # int4 weights are a fraction of fp32's
    assert int4["streamed_weight_bytes"] < 0.5 * report.system("luffy")["streamed_weight_bytes"]
    luffy = report.system("luffy")
    assert luffy["status"] == "ok" and luffy["build_source"] == "measured" and luffy["build_s"] > 0
    assert luffy["parity"]["passed"]
    if importlib.util.find_spec("onnxruntime_genai") is None:
        genai = report.system("genai")
        assert genai["status"] == "skipped" and "onnxruntime-genai not installed" in genai["reason"]
    for system in report.systems:
        assert system["status"] in ("ok", "skipped"), system
        if system["status"] != "ok":
            assert system["reason"]
            continue
        assert 0 < system["baseline_rss_mib"] <= system["peak_rss_mib"]
        assert 0 < system["streamed_weight_bytes"] <= system["weight_bytes"]
        assert [r["batch"] for r in system["results"]] == BATCHES
        for result in system["results"]:
            assert len(result["runs"]) == 2 and all(0 < r["ttft_s"] < r["total_s"] for r in result["runs"])
            for key in STATS:
                assert_sane_stats(result[key], 2)
            assert result["roofline_tok_s"] > 0 and result["roofline_fraction"] > 0
            # each run is held against the bandwidth measured just before its round
            assert all(r["bandwidth_gb_s"] > 0 and 0 < r["settle_s"] <= 3.5 for r in result["runs"])
            fractions = [result["batch"] * (GEN_LEN - 1) / (r["total_s"] - r["ttft_s"])
                         / (result["batch"] * r["bandwidth_gb_s"] * 1e9 / system["streamed_weight_bytes"])
                         for r in result["runs"]]
            assert result["roofline_fraction"] == pytest.approx(float(np.median(fractions)))
            assert 0 <= result["tokens_agree_with_luffy"] <= GEN_LEN
        if system["name"] != "torch":
            assert system["build_s"] is None or system["build_s"] > 0
    # fp32 peers compute the same model: at least the first greedy token matches luffy's
    assert report.system("torch")["results"][0]["tokens_agree_with_luffy"] >= 1
    assert report.system("ort-export")["results"][0]["tokens_agree_with_luffy"] >= 1

    data = json.loads(report.to_json())
    assert data["bandwidth"]["gb_per_s"] > 0 and data["bandwidth"]["by_threads"]
    rounds = data["bandwidth"]["per_round"]
    assert rounds["n"] == len(BATCHES) * 2 == len(rounds["gb_per_s"]) and rounds["min"] > 0
    assert set(luffy["huge_pages"]) == {"bytes", "regions", "refused", "seconds"}
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"] and data["machine"]["versions"]["luffy"]
    assert data["settings"]["batches"] == BATCHES and "decode_tok_s" in data["definitions"]
    markdown = report.to_markdown()
    assert TABLE_HEADER in markdown and "Batch scaling" in markdown and "| luffy -O2 fp32 | 1 |" in markdown
    assert f"re-measured before each of the {len(BATCHES) * 2} timed rounds" in markdown


def test_bench_cli_on_an_artifact_writes_json_and_markdown(tiny, tmp_path):
    _, work = tiny
    # --workdir: the zoo model saved as a HF directory by the fixture's bench is reused, not saved again
    proc = luffy_cli("bench", work / "luffy-artifact", "--prompt-len", 6, "--gen-len", 3, "--repeats", 1, "--warmup", 0,
                     "--vs", "torch", "--no-bandwidth", "--json", tmp_path / "b.json", "--markdown", tmp_path / "b.md",
                     "--workdir", work)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    luffy, torch = data["systems"]
    assert luffy["build_source"] == "manifest" and luffy["build_s"] > 0  # compile time from the artifact's report
    assert torch["status"] == "ok" and data["bandwidth"] is None
    assert luffy["results"][0]["roofline_tok_s"] is None
    assert_sane_stats(luffy["results"][0]["decode_tok_s"], 1)
    assert TABLE_HEADER in proc.stdout and TABLE_HEADER in (tmp_path / "b.md").read_text()


def test_bench_suite_writes_json_and_markdown(tiny, tmp_path):
    _, work = tiny
    out = tmp_path / "suite"
    proc = luffy_cli("bench", work / "luffy-artifact", "--suite", "--out", out, "--prompt-len", 6, "--gen-len", 3,
                     "--batch", "1,2", "--repeats", 1, "--warmup", 0, "--vs", "", "--bandwidth-mib", 16)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    assert [s["name"] for s in data["systems"]] == ["luffy"] and data["settings"]["batches"] == [1, 2]
    assert "--suite" in data["suite"]["command"]
    markdown = (out / "bench.md").read_text()
    assert TABLE_HEADER in markdown and "Batch scaling" in markdown and "Machine:" in markdown


def test_reference_model_is_seeded_and_reused(tmp_path):
    from luffy.benchmarks.models import reference_llama

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, vocab_size=300)
    first = reference_llama(str(tmp_path / "ref"), **small)
    assert first["parameters"] > 0 and not first["reused"]
    assert (tmp_path / "ref" / "config.json").is_file() and (tmp_path / "ref" / "tokenizer.json").is_file()
    assert reference_llama(str(tmp_path / "ref"), **small)["reused"]


def test_peers_needing_the_hf_directory_are_skipped_with_the_reason(tiny, tmp_path):
    _, work = tiny
    artifact = tmp_path / "artifact"
    shutil.copytree(work / "luffy-artifact", artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["source"] = {"kind": "onnx", "spec": "model.onnx", "path": "/nowhere/model.onnx", "architecture": None}
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    report = bench(artifact, prompt_len=4, gen_len=2, vs="torch", repeats=1, warmup=0, bandwidth=False)
    torch = report.system("torch")
    assert torch["status"] == "skipped" and "Hugging Face directory" in torch["reason"]
    assert report.system("luffy")["status"] == "ok"
    with pytest.raises(CapacityError, match="maximum sequence length"):
        bench(artifact, prompt_len=500, gen_len=100, repeats=1, warmup=0, bandwidth=False)


def test_bench_usage_errors_are_one_line():
    with pytest.raises(UsageError, match="unknown peer"):
        bench("llama-tiny", vs="torch,vllm")
    with pytest.raises(UsageError, match="batch"):
        bench("llama-tiny", batch="1,x")
    with pytest.raises(UsageError, match="--gen-len"):
        bench("llama-tiny", gen_len=1)
    for args, code in ((["/no/such/model"], 3), (["llama-tiny", "--vs", "bogus"], 2), ([], 2)):
        proc = luffy_cli("bench", *args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("luffy: error: "), proc.stderr
    help_text = luffy_cli("bench", "--help").stdout
    assert "Example: luffy bench" in help_text and "--vs" in help_text


def test_matmul_ceiling_times_the_artifacts_matmuls_against_the_probe(zoo_artifacts):
    import onnx

    from luffy.benchmarks.ceiling import matmul_ceiling

    artifact, _ = zoo_artifacts("llama-tiny")
    model = onnx.load(str(artifact.path / "model.onnx"))
    weights = {i.name: i for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    result = matmul_ceiling(artifact.path, rounds=2, runs=3, buffer_mib=16)
    assert result["matmuls"] == len(matmuls) > 0
    assert result["weight_bytes"] == sum(4 * weights[n.input[1]].dims[0] * weights[n.input[1]].dims[1] for n in matmuls)
    assert result["matmul_gb_per_s"] > 0 and result["probe_gb_per_s"] > 0 and result["fraction"] > 0


def test_step_profile_splits_decode_steps_by_op_from_orts_trace(pydoc_int8):
    import onnx

    from luffy.benchmarks.step_profile import markdown, profile_steps

    graph = onnx.load(str(pydoc_int8.path / "model.onnx"), load_external_data=False).graph
    quantized = sum(n.op_type == "MatMulNBits" for n in graph.node)
    report = profile_steps(pydoc_int8.path, rows=2, prompt_len=8, steps=4)
    assert report["steps"] == 3  # four decode steps, the first a warm-up
    ops = report["ops"]
    assert ops["MatMulNBits"]["calls"] == quantized > 0  # one trace event per node per step, none lost or doubled
    assert ops["GroupQueryAttention"]["calls"] == sum(n.op_type == "GroupQueryAttention" for n in graph.node)
    assert 0 < report["nodes_us"] <= report["run_us"] and report["wall_unprofiled_us"] > 0
    assert all(0 < row["us"] <= report["nodes_us"] and 0 < row["share_of_nodes"] <= 1 for row in ops.values())
    table = markdown(report)
    assert "| MatMulNBits |" in table and table.startswith("rows 2, prompt 8, 3 steps")


def test_step_profile_refuses_bad_arguments_in_one_line(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "luffy.benchmarks.step_profile", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    few = run(tmp_path, "--steps", "1")
    assert few.returncode == 2 and "--steps at least 2" in few.stderr.strip().splitlines()[-1]
    missing = run(tmp_path / "nowhere")
    assert missing.returncode == 1 and missing.stderr.strip().startswith("step_profile: ")
    assert len(missing.stderr.strip().splitlines()) == 1 and "nowhere" in missing.stderr


def test_bench_serve_reports_what_vllm_bench_serve_reports(zoo_artifacts, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    pytest.importorskip("openai", reason="the openai client is not installed")
    artifact, _ = zoo_artifacts("llama-pydoc")
    proc = luffy_cli("bench", "serve", artifact.path, "--concurrency", "1,3", "--num-prompts", "6", "--input-len", "8:16",
                     "--output-len", "5:9", "--static-batch", "1,3", "--goodput", "ttft:60000", "--shared-prefix", "96:8", "--json",
                     tmp_path / "serve.json", "--markdown", tmp_path / "serve.md")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "serve.json").read_text())
    assert [r["concurrency"] for r in report["served"]] == [1, 3]
    assert [r["batch"] for r in report["static"]] == [1, 3]
    for run in report["served"]:
        assert run["completed"] == 6 and run["failed"] == 0 and run["errors"] == []
        assert run["goodput"] == pytest.approx(run["request_throughput"])  # a minute's TTFT SLO: every request meets it
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert 0 < run[key]["median"] <= run[key]["p99"], (key, run[key])
        assert run["ttft_s"]["median"] < run["e2e_s"]["median"] and run["server_itl_mean_s"] > 0
    requested = sum(n for _, n in ServeLoad(6, (8, 16), (5, 9), 0).requests(320))
    served = report["served"][0]
    assert served["output_throughput"] * served["duration_s"] == pytest.approx(requested)  # ignore_eos: exact lengths
    assert report["server_exit_code"] == 0 and report["server_rss_mib"]["after_all"] > 0
    prefix = report["prefix_cache"]
    assert prefix["prefix_len"] == 96 and len(prefix["rounds"]) == 5 and prefix["hit_ttft_s"]["median"] > 0
    rounds = report["streaming_overhead"]["rounds"]
    assert len(rounds) == 6 and all(r["ratio"] == pytest.approx(r["served_tpot_s"] / r["in_process_tpot_s"]) for r in rounds)
    table = (tmp_path / "serve.md").read_text()
    assert table.count("| luffy serve |") == 2 and table.count("| Engine.generate static batch") == 2


def test_peers_outside_luffys_python_are_skipped_with_how_to_install_them(tiny, tmp_path):
    _, work = tiny
    missing = {"llama.cpp": tmp_path / "no-bin", "openvino": tmp_path / "no-python", "ctranslate2": tmp_path / "no-python"}
    report = bench(work / "luffy-artifact", prompt_len=4, gen_len=2, vs="llama.cpp,openvino,ctranslate2", repeats=1,
                   warmup=0, bandwidth=False, peer_paths={k: str(v) for k, v in missing.items()})
    for name, install in (("llama.cpp", "llama-bench"), ("openvino", "pip install openvino-genai"),
                          ("ctranslate2", "pip install ctranslate2")):
        system = report.system(name)
        assert system["status"] == "skipped" and f"{name} not found" in system["reason"] and install in system["reason"]
        assert f"- {name}: skipped — {name} not found" in report.to_markdown()
    assert report.system("luffy")["status"] == "ok"
    with pytest.raises(UsageError, match="--peer vllm=x: expected NAME=PATH"):
        bench(work / "luffy-artifact", vs="llama.cpp", peer_paths=["vllm=x"])


def _state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T for stopped, ...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not hasattr(os, "killpg") or not os.path.isdir("/proc/self"), reason="POSIX process groups and /proc")
def test_an_idle_worker_is_stopped_while_others_run_and_answers_after(tmp_path):
    # the bench stops every worker but the one it times; a stopped worker (and anything it started, in its
    # process group) takes no CPU until its next request, which resumes it
    with Worker(tmp_path / "worker.log") as worker:
        worker.request("call", func="luffy.benchmarks.worker:_peak_rss_bytes", kwargs={})
        assert os.getpgid(worker.proc.pid) == worker.proc.pid != os.getpgid(0)
        worker.pause()
        assert _state(worker.proc.pid) == "T"
        ticks = _cpu_ticks(worker.proc.pid)
        time.sleep(0.3)
        assert _cpu_ticks(worker.proc.pid) == ticks
        assert worker.request("rss")["peak_rss_bytes"] > 0
        assert _state(worker.proc.pid) != "T" and not worker.paused
        worker.pause()
    assert worker.proc.returncode == 0  # close resumes a stopped worker before asking it to exit
