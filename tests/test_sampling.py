"""The logits chain (runtimes/sampling.py): transformers' processors and OpenAI's penalties, in the documented
order; neutral values change nothing; seeds make sampling reproducible."""

import numpy as np
import pytest

from luffy.runtimes.sampling import Sampling, TokenChooser, choose_rows, logprobs


def select_next(logits, do_sample, temperature, top_k, top_p, rng, min_p=0.0):
    """One token per row through the chain's last step, rows sharing one sampler."""
    sampling = Sampling(do_sample, temperature, top_k, top_p, min_p)
    return choose_rows([TokenChooser(sampling) for _ in logits], logits, rng)


def _kept(scores):
    return np.isfinite(scores)


@pytest.mark.parametrize("top_k, top_p, temperature, min_p", [(0, 0.9, 1.0, 0.0), (5, 1.0, 1.0, 0.0),
                                                                (10, 0.5, 0.7, 0.0), (0, 0.3, 2.0, 0.0),
                                                                (0, 1.0, 1.0, 0.1), (20, 0.95, 0.8, 0.05)])
def test_filtering_matches_transformers(top_k, top_p, temperature, min_p):
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    allowed = _kept(warpers(None, torch.tensor(logits)).numpy())
    # every sampled token lies in transformers' allowed set, and the whole set gets sampled
    seen = np.zeros_like(allowed)
    gen = np.random.default_rng(1)
    for _ in range(2000):
        picks = select_next(logits, True, temperature, top_k, top_p, gen, min_p)
        seen[np.arange(4), picks] = True
    assert not (seen & ~allowed).any()
    assert (seen == allowed).all()


def test_greedy_is_argmax_and_seed_reproduces():
    logits = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    assert select_next(logits, False, 1.0, 0, 1.0, np.random.default_rng()).tolist() == logits.argmax(-1).tolist()
    a = [select_next(logits, True, 1.0, 0, 1.0, np.random.default_rng(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_sampling_frequencies_follow_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    gen = np.random.default_rng(3)
    counts = np.bincount([select_next(logits, True, 1.0, 0, 1.0, gen)[0] for _ in range(20000)], minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.015)


def test_engine_sampling_is_seeded(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    engine = artifact.load()
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, eos_token_id=None)
    a = engine.generate([[256, 1, 2]], seed=5, **kw)
    b = engine.generate([[256, 1, 2]], seed=5, **kw)
    c = engine.generate([[256, 1, 2]], seed=6, **kw)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_eos_stops_and_pads_finished_rows(zoo_artifacts):
    artifact, model = zoo_artifacts("gpt2-tiny")
    engine = artifact.load()
    first = engine.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id=None)[0, 3:]
    eos = int(first[0])  # declare row 0's first generated token to be EOS
    out = engine.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=10, eos_token_id=eos, pad_token_id=258)
    assert out[0, 3] == eos and (out[0, 4:] == 258).all()
    if eos not in out[1, 3:].tolist():  # the other row runs on to the limit
        assert out.shape == (2, 13)
    # min_new_tokens forbids EOS until reached
    forced = engine.generate([[1, 2, 3]], max_new_tokens=6, min_new_tokens=6, eos_token_id=eos)
    assert forced.shape == (1, 9) and eos not in forced[0, 3:].tolist()


# -- the chain's steps and their order ------------------------------------------------------------------------

class _Forbid:
    """A Constraint (the protocol structured outputs implement) that forbids one token and records what it saw."""

    def __init__(self, token):
        self.token, self.seen, self.accepted = token, [], []

    def mask(self, logits):
        self.seen.append(logits.copy())
        logits[self.token] = -np.inf

    def accept(self, token):
        self.accepted.append(token)

    def rollback(self, tokens):
        del self.accepted[-tokens:]

    def is_finished(self):
        return len(self.accepted) >= 4


def test_the_chain_runs_penalties_bias_grammar_min_tokens_in_order():
    from luffy.runtimes.sampling import Constraint

    raw = np.random.default_rng(0).standard_normal(12).astype(np.float32) * 2
    raw[1], raw[5] = 1.5, -1.5  # prompt tokens, one positive and one negative logit
    forbid = _Forbid(4)
    assert isinstance(forbid, Constraint)
    sampling = Sampling(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 5.0},
                        stop_ids=np.array([7]), min_tokens=5)
    chooser = TokenChooser(sampling, prompt_ids=[1, 5], constraint=forbid)
    for token in (2, 2, 9):
        chooser.accept(token)
    expected = raw.copy()
    for token in (1, 5, 2, 9):  # 1. repetition over prompt + output
        expected[token] = expected[token] / 2 if expected[token] > 0 else expected[token] * 2
    expected[2] -= 0.25 * 2 + 0.5  # 1. frequency x count + presence, output only
    expected[9] -= 0.25 * 1 + 0.5
    expected[3] += 5.0  # 2. bias
    scores = chooser.scores(raw)
    np.testing.assert_allclose(forbid.seen[-1], expected, rtol=1e-6)  # 3. the grammar sees 1 and 2 done, not 4
    assert np.isneginf(scores[[4, 7]]).all()  # 3. its mask, 4. min_tokens (3 of 5 out) masks the stop id
    keep = np.ones(12, bool)
    keep[[4, 7]] = False
    np.testing.assert_allclose(scores[keep], expected[keep], rtol=1e-6)
    assert chooser.choose(raw, None) == int(np.argmax(scores)) and np.array_equal(raw, raw.copy())  # raw untouched
    chooser.accept(0)
    assert forbid.accepted == [2, 2, 9, 0] and chooser.finished  # accept advances the grammar
    chooser.rollback(2)
    assert forbid.accepted == [2, 2] and chooser.output == [2, 2] and not chooser.finished
    assert chooser.scores(raw)[9] == raw[9]  # 9 was rolled back: no longer penalized


def test_repetition_penalty_is_transformers_and_presence_frequency_are_openais():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    raw = rng.standard_normal(40).astype(np.float32) * 3
    prompt, output = [3, 3, 8, 21], [8, 30, 30, 30, 2]
    for penalty in (0.7, 1.3):
        chooser = TokenChooser(Sampling(repetition_penalty=penalty), prompt)
        for token in output:
            chooser.accept(token)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), torch.tensor(raw[None]))
        np.testing.assert_array_equal(chooser.scores(raw), ref[0].numpy())
    # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c over the output so far
    chooser = TokenChooser(Sampling(presence_penalty=-0.4, frequency_penalty=1.1), prompt)
    for token in output:
        chooser.accept(token)
    expected = raw.copy()
    for j in range(40):
        c = output.count(j)
        expected[j] = raw[j] - c * 1.1 - float(c > 0) * -0.4
    np.testing.assert_allclose(chooser.scores(raw), expected, rtol=1e-6)


def test_neutral_values_process_nothing_and_tiny_temperature_is_greedy():
    raw = np.random.default_rng(2).standard_normal(30).astype(np.float32)
    neutral = TokenChooser(Sampling(do_sample=True, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                    logit_bias={}, min_p=0.0, stop_ids=np.array([1]), min_tokens=0), [1, 2, 3])
    neutral.accept(4)
    assert neutral.scores(raw) is raw  # not even a copy: the tokens are what they were before the chain
    for temperature in (1e-40, 1e-6):  # 1e-40 used to divide the logits into inf and NaN (NUL bytes)
        assert TokenChooser(Sampling(do_sample=True, temperature=temperature)).choose(raw, np.random.default_rng(0)) == \
            int(np.argmax(raw))
    assert Sampling(do_sample=True, temperature=1e-5).greedy is False


@pytest.mark.parametrize("bad, message", [
    (dict(min_p=1.5), "min_p must be in [0, 1]"), (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(logit_bias={5: 101.0}), "bias 101.0 for token 5 must be in [-100, 100]"),
    (dict(logit_bias={320: 1.0}), "token id 320 is outside the vocabulary of size 320"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when sampling"),
])
def test_bad_values_are_refused_in_one_line(zoo_artifacts, bad, message):
    import luffy

    engine = zoo_artifacts("llama-tiny")[0].load()
    with pytest.raises(luffy.UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.generate([[256, 1]], max_new_tokens=2, **bad)


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    raw = np.random.default_rng(3).standard_normal((2, 50)).astype(np.float32) * 5
    lp = logprobs(raw)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(lp - raw, (lp - raw)[:, :1].repeat(50, 1), atol=1e-5)  # a shift of the logits


# -- the chain inside Engine.generate --------------------------------------------------------------------------

def test_neutral_values_leave_generate_as_before(zoo_artifacts):
    """Neutral values give the tokens of no values at all, and those are the pre-chain rule's: argmax, or one
    inverse-CDF draw per row per step from the softmax of logits / temperature, EOS masked below min_new_tokens."""
    from luffy.runtimes.generation import left_pad

    engine = zoo_artifacts("llama-tiny")[0].load()
    rows = [[256, 1, 2], [256, 7, 8, 9, 10], [256]]
    neutral = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias={}, min_p=0.0)
    eos = engine.manifest["generation"]["eos_token_id"]
    for kwargs in (dict(), dict(do_sample=True, temperature=0.7, seed=4, min_new_tokens=6)):
        plain = engine.generate(rows, max_new_tokens=12, **kwargs)
        np.testing.assert_array_equal(engine.generate(rows, max_new_tokens=12, **kwargs, **neutral), plain)
        # the rule as it was, on the engine's own logits
        ids, mask = left_pad(rows, engine._pad_id(None))
        _, logits = engine.generate(rows, max_new_tokens=12, output_logits=True, **kwargs)
        rng, temperature = np.random.default_rng(kwargs.get("seed")), kwargs.get("temperature", 1.0)
        for step in range(logits.shape[1]):
            scores = logits[:, step].copy()
            if step < kwargs.get("min_new_tokens", 0):
                scores[:, eos] = -np.inf
            if kwargs.get("do_sample"):
                e = np.exp(scores / temperature - (scores / temperature).max(-1, keepdims=True))
                cdf = np.cumsum(e / e.sum(-1, keepdims=True), -1)
                token = (cdf < rng.random(len(rows))[:, None] * cdf[:, -1:]).sum(-1)
            else:
                token = scores.argmax(-1)
            alive = ~np.isin(plain[:, ids.shape[1]:ids.shape[1] + step], eos).any(-1)
            np.testing.assert_array_equal(plain[alive, ids.shape[1] + step], token[alive])


def test_generate_repetition_penalty_matches_transformers(zoo_artifacts):
    import torch

    artifact, model = zoo_artifacts("llama-tiny")
    engine = artifact.load()
    prompt = [256, 5, 6, 7, 5, 6]
    ids = engine.generate([prompt], max_new_tokens=24, min_new_tokens=24, repetition_penalty=1.4)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=24, min_new_tokens=24, do_sample=False, repetition_penalty=1.4,
                             pad_token_id=0)
    assert ids.tolist() == ref.numpy().tolist()
    assert ids.tolist() != engine.generate([prompt], max_new_tokens=24, min_new_tokens=24).tolist()


def test_generate_logit_bias_and_a_constraint_steer_every_row(zoo_artifacts):
    engine = zoo_artifacts("llama-tiny")[0].load()
    rows = [[256, 1, 2], [256, 9]]
    forced = engine.generate(rows, max_new_tokens=6, eos_token_id=None, logit_bias={77: 100.0})
    assert (forced[:, -6:] == 77).all()
    grammars = [_Forbid(77), None]
    steered = engine.generate(rows, max_new_tokens=6, eos_token_id=None, logit_bias={77: 100.0}, constraint=grammars)
    assert 77 not in steered[0, -6:].tolist() and (steered[1, -6:] == 77).all()
    # the grammar was complete after 4 tokens: its row ends there (padded), the free row runs on
    assert grammars[0].accepted == steered[0, 3:7].tolist() and len(grammars[0].accepted) == 4
