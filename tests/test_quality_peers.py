"""benchmarks/quality_peers.py: llama-perplexity's output parsed, its window scheme reproduced for luffy's artifacts
(checked against a direct PyTorch computation on llama-pydoc), and, where llama.cpp is built, the same numbers as
llama-perplexity itself on the same f32 weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from luffy.benchmarks.models import zoo_hf_dir
from luffy.benchmarks.native_peers import convert_to_gguf, llama_cpp_bin, llama_cpp_tree
from luffy.benchmarks.quality_peers import (chunked_perplexity, estimate, llama_chunks, llama_perplexity,
                                            luffy_perplexity, paired_vs_base, parse_kl_divergence,
                                            parse_llama_perplexity, parse_version, read_base_tokens, tokenizer_bos)
from luffy.errors import UsageError
from luffy.models_zoo.trained import heldout_text_path

# llama-perplexity's log of llama-pydoc's f32 GGUF on heldout.txt at -c 256 (the llama.cpp build of 2026-12-03,
# "version: 0.6.0-dev (build 0, commit unknown)"), as captured; the progress line cut after chunk 10.
SAMPLE = """\
0.01.126.515 I perplexity: tokenizing the input ..
0.01.139.964 I perplexity: tokenization took 13.433 ms
0.01.140.021 I perplexity: calculating perplexity over 93 chunks, n_ctx=256, batch_size=2048, n_seq=8
0.05.777.771 I perplexity: 4.63 seconds per pass - ETA 0.88 minutes
[1]5.5284,[2]7.5085,[3]6.5902,[4]5.9441,[5]5.4729,[6]5.0158,[7]4.6106,[8]4.5951,[9]4.3260,[10]4.3272,
0.40.390.312 I Final estimate: PPL = 3.5272 +/- 0.05264
"""
# The statistics of `llama-perplexity -m q8_0.gguf --kl-divergence-base f32.kld --kl-divergence -c 256` on the same
# text, as captured, the percentile lines left out.
KLD_SAMPLE = """\
====== Perplexity statistics ======
Mean PPL(Q)                   :   3.527417 ±   0.052637
Mean PPL(base)                :   3.527210 ±   0.052641
Cor(ln(PPL(Q)), ln(PPL(base))): 100.00%
Mean ln(PPL(Q)/PPL(base))     :   0.000059 ±   0.000117
Mean PPL(Q)/PPL(base)         :   1.000059 ±   0.000117
Mean PPL(Q)-PPL(base)         :   0.000207 ±   0.000412

====== KL divergence statistics ======
Mean    KLD:   0.000080 ±   0.000001
Maximum KLD:   0.002973
Median  KLD:   0.000043
Minimum KLD:  -0.000052

====== Token probability statistics ======
Mean    Δp: -0.009 ± 0.003 %
Maximum Δp:  3.382%
Median  Δp: -0.000%
Minimum Δp: -2.681%
RMS Δp    :  0.315 ± 0.005 %
Same top p: 99.424 ± 0.070 %
"""
# llama.cpp's build directory for the end-to-end check: LUFFY_LLAMA_CPP_BIN, else llama-perplexity on PATH.
LLAMA_BIN = llama_cpp_bin(os.environ.get("LUFFY_LLAMA_CPP_BIN"), "llama-perplexity")


def test_parse_llama_perplexity_output():
    parsed = parse_llama_perplexity(SAMPLE)
    assert parsed == {"ppl": 3.5272, "ppl_error": 0.05264, "chunks": 93, "n_ctx": 256, "scored_tokens": 93 * 127}
    assert parse_version("version: 0.6.0-dev (build 0, commit unknown)\nbuilt with GNU 12.2.0") == \
        "0.6.0-dev (build 0, commit unknown)"
    with pytest.raises(ValueError, match="no 'Final estimate: PPL = ...' line .*you need at least 512 tokens"):
        parse_llama_perplexity("perplexity: you need at least 512 tokens to evaluate perplexity\n")


def test_parse_kl_divergence_output():
    assert parse_kl_divergence(KLD_SAMPLE) == {
        "ppl_ratio": 1.000059, "ppl_ratio_error": 0.000117, "kld": 0.00008, "kld_error": 0.000001,
        "same_top_pct": 99.424, "same_top_pct_error": 0.07}
    with pytest.raises(ValueError, match="no 'Mean    KLD' line"):
        parse_kl_divergence(KLD_SAMPLE.replace("Mean    KLD", "Mean KL"))


def test_paired_statistics_are_llama_perplexitys():
    rng = np.random.default_rng(0)
    base = np.log(rng.dirichlet(np.ones(5), size=200))
    quantized = base + rng.normal(0, 0.05, base.shape)  # perturbed, then renormalized: log-probabilities again
    quantized -= np.log(np.exp(quantized).sum(-1, keepdims=True))
    targets = rng.integers(0, 5, 200)
    nll_q, nll_b = -quantized[np.arange(200), targets], -base[np.arange(200), targets]
    paired = paired_vs_base(quantized, base, targets)
    assert paired["ppl_ratio"] == pytest.approx(estimate(nll_q)["ppl"] / estimate(nll_b)["ppl"], rel=1e-12)
    difference = nll_q - nll_b
    assert paired["ppl_ratio_error"] == pytest.approx(paired["ppl_ratio"] * difference.std() / np.sqrt(199), rel=1e-9)
    kld = (np.exp(base) * (base - quantized)).sum(-1)
    assert paired["kld"] == pytest.approx(kld.mean(), rel=1e-12) and paired["kld"] > 0
    assert paired["same_top_pct"] == pytest.approx(100 * np.mean(base.argmax(-1) == quantized.argmax(-1)))
    same = paired_vs_base(base, base, targets)
    assert (same["ppl_ratio"], same["ppl_ratio_error"], same["kld"], same["same_top_pct"]) == (1.0, 0.0, 0.0, 100.0)


def test_chunks_are_llama_perplexitys():
    ids = list(range(1000, 1000 + 103))  # 6 chunks of 16, 7 tokens dropped
    chunks = llama_chunks(ids, 16, bos_id=1)
    assert len(chunks) == 6 and all(len(c) == 16 for c in chunks)
    assert [c[0] for c in chunks] == [1] * 6  # every chunk starts from BOS
    assert [c[1:] for c in chunks] == [ids[16 * i + 1:16 * (i + 1)] for i in range(6)]
    assert llama_chunks(ids, 16, bos_id=None)[2] == ids[32:48]  # a tokenizer without BOS: chunks as they are
    with pytest.raises(UsageError, match="tokenizes to 20 tokens; a context of 16 needs at least 32"):
        llama_chunks(ids[:20], 16, 1)
    with pytest.raises(UsageError, match="--ctx 15"):
        llama_chunks(ids, 15, 1)


def test_estimate_is_llama_perplexitys_formula():
    nll = np.array([1.0, 2.0, 0.5, 1.5])
    mean, mean_sq = nll.mean(), (nll ** 2).mean()
    result = estimate(nll)
    assert result["ppl"] == pytest.approx(np.exp(mean), rel=1e-12)
    assert result["ppl_error"] == pytest.approx(np.sqrt((mean_sq - mean ** 2) / 3) * np.exp(mean), rel=1e-12)
    assert result["scored_tokens"] == 4


def _direct_perplexity(model, ids: list[int], n_ctx: int, bos: int) -> tuple[float, int]:
    """Perplexity of the second halves of consecutive n_ctx-token chunks, each begun with BOS, straight from PyTorch."""
    import torch

    nll, count = 0.0, 0
    for start in range(0, len(ids) - n_ctx + 1, n_ctx):
        chunk = [bos] + ids[start + 1:start + n_ctx]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), dim=-1)
        for position in range(n_ctx // 2, n_ctx - 1):
            nll -= float(log_probs[position, chunk[position + 1]])
            count += 1
    return float(np.exp(nll / count)), count


def test_scheme_on_an_artifact_equals_pytorch_directly(zoo_artifacts):
    artifact, model = zoo_artifacts("llama-pydoc")
    text = heldout_text_path().read_text(encoding="utf-8")[:1000]
    engine = artifact.load()
    bos = tokenizer_bos(engine.tokenizer)
    ids = engine.tokenizer.encode(text).ids
    assert bos == 256 and ids[0] == bos and len(ids) == 1001  # llama-pydoc: BOS, then one token per byte
    result = luffy_perplexity(artifact.path, text, 64)
    expected, count = _direct_perplexity(model, ids, 64, bos)
    assert (result["chunks"], result["scored_tokens"], result["text_tokens"]) == (15, count, 1001) and count == 15 * 31
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    # batching chunks into one score() call changes nothing: rows one at a time give the same estimate
    alone = chunked_perplexity(engine.score, ids, 64, bos, rows=1)
    assert alone["ppl"] == pytest.approx(result["ppl"], rel=1e-6)


@pytest.mark.skipif(LLAMA_BIN is None or llama_cpp_tree(LLAMA_BIN) is None,
                    reason="llama.cpp not built: set LUFFY_LLAMA_CPP_BIN to its build/bin (llama-perplexity, "
                           "convert_hf_to_gguf.py above it) to compare with llama-perplexity itself")
def test_same_perplexity_as_llama_perplexity_on_f32(zoo_artifacts, tmp_path):
    """llama-pydoc's f32 GGUF under llama-perplexity and its fp32 artifact under the reproduced scheme: the byte
    tokenizer gives both the same ids, so the two estimates agree to float rounding."""
    artifact, _ = zoo_artifacts("llama-pydoc")
    text_file = tmp_path / "text.txt"
    text_file.write_text(heldout_text_path().read_text(encoding="utf-8")[:4000], encoding="utf-8")
    hf_dir = Path(zoo_hf_dir("llama-pydoc", str(tmp_path / "hf"))["path"])
    convert_to_gguf(llama_cpp_tree(LLAMA_BIN), hf_dir, tmp_path / "f32.gguf")
    theirs = llama_perplexity(LLAMA_BIN, tmp_path / "f32.gguf", text_file, 128, base_logits=tmp_path / "f32.kld")
    text = text_file.read_text(encoding="utf-8")
    ours = luffy_perplexity(artifact.path, text, 128)
    n_ctx, evaluated = read_base_tokens(tmp_path / "f32.kld")
    assert n_ctx == 128 and evaluated == artifact.load().tokenizer.encode(text).ids[:31 * 128]  # the same ids
    assert (theirs["chunks"], theirs["scored_tokens"]) == (ours["chunks"], ours["scored_tokens"]) == (31, 31 * 63)
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=2e-4)  # llama-perplexity prints 4 decimals
    assert theirs["ppl_error"] == pytest.approx(ours["ppl_error"], rel=2e-3)
