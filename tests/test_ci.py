"""What a CI step needs: reproducible artifacts, `luffy verify`, and logs without terminal tricks."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import luffy
from luffy.tests.helpers import luffy_cli


def _model_bytes(artifact) -> dict:
    return {name: info["sha256"] for name, info in artifact.manifest["files"].items() if name.startswith("model.onnx")}


def test_the_same_source_and_flags_give_the_same_model_bytes(tmp_path):
    # fp32 with the weights in model.onnx.data; int4 with GPTQ is checked in test_quantization_quality.py
    first = luffy.compile("llama-tiny", output=tmp_path / "a", external_data="always")
    second = luffy.compile("llama-tiny", output=tmp_path / "elsewhere" / "b", external_data="always")
    assert set(_model_bytes(first)) == {"model.onnx", "model.onnx.data"}
    assert _model_bytes(first) == _model_bytes(second)


@pytest.fixture()
def copied(zoo_artifacts, tmp_path):
    artifact, _ = zoo_artifacts("llama-tiny")
    shutil.copytree(artifact.path, tmp_path / "art")
    return tmp_path / "art"


def test_verify_passes_an_intact_artifact_and_its_parity(copied):
    proc = luffy_cli("verify", copied, "--parity", "llama-tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [c["check"] for c in result["checks"]] == ["files", "runtime", "load", "smoke run", "parity"]
    assert "against llama-tiny" in result["checks"][-1]["detail"]


def _one_line_error(proc, *fragments):
    assert proc.returncode == luffy.ArtifactError.exit_code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("luffy: error: ")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_verify_refuses_tampered_missing_and_mismatched_artifacts(copied):
    (copied / "tokenizer.json").write_text((copied / "tokenizer.json").read_text().replace("<bos>", "<BOS>"))
    _one_line_error(luffy_cli("verify", copied), "files failed", "tokenizer.json", "does not match")
    manifest = json.loads((copied / "manifest.json").read_text())
    (copied / "tokenizer.json").unlink()
    _one_line_error(luffy_cli("verify", copied), "files failed", "tokenizer.json: listed in the manifest but missing")
    del manifest["files"]["tokenizer.json"]
    manifest["tokenizer"] = None
    manifest["opset_imports"]["ai.onnx"] = 40  # written for a runtime newer than the one installed here
    (copied / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(luffy_cli("verify", copied), "runtime failed", "ai.onnx opset 40")
    manifest["format_version"] = 99
    (copied / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(luffy_cli("verify", copied), "format_version 99 is not supported")


def test_verify_parity_against_another_source_fails(copied, tmp_path):
    # another architecture is refused by its KV layout; the same architecture with other weights by the numbers
    _one_line_error(luffy_cli("verify", copied, "--parity", "gpt2-tiny"), "parity failed", "against gpt2-tiny",
                    "KV cache")
    import torch
    from transformers import PreTrainedTokenizerFast

    from luffy.models_zoo.byte_tokenizer import byte_tokenizer
    from luffy.models_zoo.tiny import llama_tiny

    module = llama_tiny()
    with torch.no_grad():
        module.lm_head.weight.mul_(1.5)  # the same architecture, other weights
    module.save_pretrained(tmp_path / "other-weights")
    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(add_bos=True)).save_pretrained(tmp_path / "other-weights")
    _one_line_error(luffy_cli("verify", copied, "--parity", tmp_path / "other-weights"), "parity failed",
                    "differs from PyTorch")


def test_a_ci_log_gets_one_line_per_stage_and_no_terminal_codes(tmp_path):
    proc = luffy_cli("compile", "llama-tiny", "-o", tmp_path / "art", env={"NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and not re.search(r"\x1b\[", proc.stderr)
    stages = [ln for ln in proc.stderr.splitlines() if ln.startswith("luffy: compiling llama-tiny: ")]
    assert [s.split(": ")[2].split(" (")[0] for s in stages][:2] == ["capturing llama-tiny", "pass inline"]
    assert any("checking parity against PyTorch" in s for s in stages)
    # the summary comes after every stage line; only its indented details (KV cache, perplexity) follow it
    lines = proc.stderr.splitlines()
    done = next(i for i, ln in enumerate(lines) if ln.startswith("✓ "))
    assert done > lines.index(stages[-1]) and all(ln.startswith("  ") for ln in lines[done + 1:])
    assert any(ln.startswith("  KV cache float32: ") for ln in lines[done + 1:])
    colored = luffy_cli("verify", tmp_path / "art", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert colored.returncode == 0 and not re.search(r"\x1b\[[0-9;]*m", colored.stdout + colored.stderr)
