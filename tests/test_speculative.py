"""Speculative decoding in Engine.generate: output identical to plain greedy, the target's distribution kept when
sampling, rejected tokens rolled back as if they never ran."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import luffy
from luffy.runtimes.sampling import Sampling, TokenChooser
from luffy.runtimes.speculative import accept_sampled

from .helpers import COMMON, NAMED_FAMILIES, PROMPT, luffy_cli, make_hf_dir


@pytest.fixture(scope="module")
def pydoc(zoo_artifacts, pydoc_int8):
    """llama-pydoc at fp32 (the target) and int8 (its draft)."""
    return zoo_artifacts("llama-pydoc")[0].load(), pydoc_int8.load()


PROMPTS = [list(b"\x00def parse("), list(b"Return the"), list(b"class Foo:\n    "), list(b"The module"),
           list(b"The module"), list(b"x")]


@pytest.mark.parametrize("how", ["draft", "prompt-lookup"])
def test_greedy_output_is_plain_greedys(pydoc, how):
    target, draft = pydoc
    kwargs = {"assistant_model": draft} if how == "draft" else {"prompt_lookup_num_tokens": 6}
    # two engines on private pools whose threads sleep between runs (this process never called
    # share_thread_pool): nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for prompt in PROMPTS[:4]:  # batch 1
            expected = target.generate([prompt], max_new_tokens=48)
            np.testing.assert_array_equal(target.generate([prompt], max_new_tokens=48, **kwargs), expected)
        ragged = target.generate(PROMPTS, max_new_tokens=24, eos_token_id=None)
        np.testing.assert_array_equal(target.generate(PROMPTS, max_new_tokens=24, eos_token_id=None, **kwargs),
                                      ragged)
    stats = target.generation_stats
    assert stats["source"] == how and stats["generated_tokens"] == 24 * len(PROMPTS)
    assert 0 <= stats["acceptance_rate"] <= 1 and stats["mean_tokens_per_target_step"] >= 1


def test_engines_take_turns_on_pools_that_sleep_between_runs(pydoc):
    # each engine's threads spin only during its own runs (session.force_spinning_stop), so target and draft never
    # compete with no call from the caller, and no process-wide pool breaks other sessions in the process
    target, draft = pydoc
    assert target.thread_pool == draft.thread_pool == {"shared": False, "threads": "all cores", "spinning": "within a run"}
    assert target.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    assert not luffy.runtimes.ort_compat.thread_pool_shared()


_POOL_SCRIPT = """
import json, sys, warnings
import luffy
from luffy.runtimes import share_thread_pool
warnings.simplefilter("error")  # no warning about unshared pools
share_thread_pool(int(sys.argv[3]))
target = luffy.load(sys.argv[1], threads=int(sys.argv[3]))
draft = luffy.load(sys.argv[2])  # no threads: it runs on the shared pool
prompt = [list(b"def parse(")]
spec = target.generate(prompt, max_new_tokens=32, assistant_model=draft)
try:
    luffy.load(sys.argv[2], threads=int(sys.argv[3]) + 1)
    refused = None
except luffy.UsageError as exc:
    refused = str(exc)
print(json.dumps([spec.tolist(), target.generate(prompt, max_new_tokens=32).tolist(), target.thread_pool,
                  draft.thread_pool, refused]))
"""


def test_a_shared_thread_pool_keeps_greedy_output(zoo_artifacts, pydoc_int8):
    # the pool is process-wide and its size permanent, so this runs in a process of its own
    proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(zoo_artifacts("llama-pydoc")[0].path),
                           str(pydoc_int8.path), "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    spec, plain, target_pool, draft_pool, refused = json.loads(proc.stdout)
    assert spec == plain and plain[0][:10] == list(b"def parse(") and len(plain[0]) > 10
    assert target_pool == draft_pool == {"shared": True, "threads": 2, "spinning": "within a run"}
    assert "share one ONNX Runtime thread pool of 2 threads" in refused


def test_a_loaded_engine_leaves_other_onnx_runtime_sessions_working(pydoc):
    # luffy.load does not make ONNX Runtime's pools process-global: a session the caller creates with default
    # options (use_per_session_threads) still loads beside the engines
    import onnxruntime as ort

    target, _ = pydoc
    session = ort.InferenceSession(str(target.path / target.manifest["model_file"]), providers=["CPUExecutionProvider"])
    assert target.thread_pool["shared"] is False and session.get_inputs()[0].name == "input_ids"


def test_zero_new_tokens_and_bad_top_p_are_handled_like_plain_generate(pydoc):
    target, draft = pydoc
    prompt = [list(b"def parse(")]
    for kwargs in ({"assistant_model": draft}, {"prompt_lookup_num_tokens": 4}):
        np.testing.assert_array_equal(target.generate(prompt, max_new_tokens=0, **kwargs), np.array(prompt))
        with pytest.raises(luffy.UsageError, match="top_p"):
            target.generate(prompt, max_new_tokens=4, do_sample=True, top_p=0.0, **kwargs)


def test_rejected_tokens_leave_the_cache_as_if_they_never_ran(pydoc):
    # prompt lookup on a prompt with repeats proposes tokens the target mostly rejects: every rejection is
    # rolled back by truncating the slot, and every later logit still equals plain decoding's
    target, _ = pydoc
    prompt = list(b"ab ab ab cd ab ab ef ab")
    plain, plain_logits = target.generate([prompt], max_new_tokens=32, eos_token_id=None, output_logits=True)
    spec, spec_logits = target.generate([prompt], max_new_tokens=32, eos_token_id=None, output_logits=True,
                                        prompt_lookup_num_tokens=4, num_assistant_tokens_schedule="constant")
    assert target.generation_stats["draft_tokens"] > target.generation_stats["accepted_tokens"] > 0
    np.testing.assert_array_equal(spec, plain)
    np.testing.assert_allclose(spec_logits, plain_logits, atol=1e-4)


@pytest.mark.parametrize("family", sorted(NAMED_FAMILIES))
def test_named_families_keep_greedy_output_with_prompt_lookup(family_artifact, family):
    artifact, _ = family_artifact(family)
    engine = artifact.load()
    prompt = PROMPT + PROMPT[:6]  # a repeat, so lookups find something
    kwargs = dict(max_new_tokens=20, eos_token_id=None, pad_token_id=0)  # tiny GPT-2's pad id lies outside its vocab
    expected = engine.generate([prompt, PROMPT[:9]], **kwargs)
    got = engine.generate([prompt, PROMPT[:9]], prompt_lookup_num_tokens=5, **kwargs)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("family", sorted(NAMED_FAMILIES))
def test_named_families_keep_greedy_output_with_a_draft(family_artifact, family):
    # the draft is another random family of the same vocabulary: it is mostly wrong, so every round exercises
    # rejection and rollback on this family's graph (and the draft's multi-token catch-up on the other's)
    engine = family_artifact(family)[0].load()
    draft = family_artifact("mistral" if family == "llama" else "llama")[0].load()
    kwargs = dict(max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    expected = engine.generate([PROMPT, PROMPT[:9]], **kwargs)
    got = engine.generate([PROMPT, PROMPT[:9]], assistant_model=draft, num_assistant_tokens=3, **kwargs)
    np.testing.assert_array_equal(got, expected)
    assert engine.generation_stats["draft_tokens"] > engine.generation_stats["accepted_tokens"]


def test_a_draft_with_another_vocabulary_is_refused(pydoc, tmp_path):
    target, _ = pydoc
    make_hf_dir("llama", dict(COMMON, vocab_size=300), tmp_path / "hf")
    other = luffy.compile(tmp_path / "hf", output=tmp_path / "other", check_parity=False).load()
    with pytest.raises(luffy.UsageError, match=r"vocabulary of 300 tokens; the target's has 320") as caught:
        target.generate([PROMPTS[1]], max_new_tokens=4, assistant_model=other)
    assert "\n" not in str(caught.value)


# -- the rejection rule keeps the target's distribution ----------------------------------------------------

def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the target gives probability 0 was emitted"
    return chisquare(counts[keep], probs[keep] * counts.sum()).pvalue


@pytest.mark.parametrize("draft", ["model", "lookup"])
def test_the_rejection_rule_emits_the_targets_distribution(draft):
    """20,000 draws of the first emitted token, against the target's distribution by a chi-square test at
    significance 1e-4: this test fails wrongly with probability 1e-4 per seed (the seed is fixed, so it is
    deterministic here). A rule that trusts the draft (always accept) fails it: checked below."""
    rng = np.random.default_rng(0)
    vocab, draws = 8, 20_000
    target_logits = np.log(np.array([0.30, 0.05, 0.20, 0.10, 0.15, 0.02, 0.08, 0.10]))
    q = np.array([0.05, 0.40, 0.05, 0.20, 0.05, 0.15, 0.05, 0.05])
    chooser = TokenChooser(Sampling(do_sample=True))
    logits = np.stack([target_logits, target_logits])  # position 0 checks the draft token, position 1 is the bonus
    counts, wrong = np.zeros(vocab, np.int64), np.zeros(vocab, np.int64)
    for _ in range(draws):
        token = int(rng.choice(vocab, p=q)) if draft == "model" else 1  # lookup: always proposes token 1
        n, nxt = accept_sampled(logits, [token], q[None, :] if draft == "model" else None, chooser, rng)
        counts[token if n == 1 else nxt] += 1
        wrong[token] += 1  # always accepting the draft emits q, not p
    p = np.exp(target_logits) / np.exp(target_logits).sum()
    assert _chi_square_p(counts, p) > 1e-4
    assert _chi_square_p(wrong, p) < 1e-4 if draft == "model" else wrong[1] == draws


def test_luffy_run_reports_speculation(zoo_artifacts, pydoc_int8):
    artifact, _ = zoo_artifacts("llama-pydoc")
    base = ["run", artifact.path, "--prompt", "Return the", "--max-new-tokens", "24", "--json"]
    plain = json.loads(luffy_cli(*base, check=True, timeout=120).stdout)
    spec = json.loads(luffy_cli(*base, "--draft", pydoc_int8.path, check=True, timeout=120).stdout)
    assert spec["output_ids"] == plain["output_ids"] and plain["speculation"] is None
    assert spec["speculation"]["source"] == "draft" and spec["speculation"]["generated_tokens"] == 24
