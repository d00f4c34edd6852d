"""Sampling follows transformers' logits processors; seeds make it reproducible."""

import numpy as np
import pytest

from luffy.runtimes.sampling import select_next


def _kept(scores):
    return np.isfinite(scores)


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 0.9, 1.0), (5, 1.0, 1.0), (10, 0.5, 0.7), (0, 0.3, 2.0)])
def test_filtering_matches_transformers(top_k, top_p, temperature):
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
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
    allowed = _kept(warpers(None, torch.tensor(logits)).numpy())
    # every sampled token lies in transformers' allowed set, and the whole set gets sampled
    seen = np.zeros_like(allowed)
    gen = np.random.default_rng(1)
    for _ in range(2000):
        picks = select_next(logits, True, temperature, top_k, top_p, gen)
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
