"""Every zoo model compiles and matches PyTorch: fp32 logits within 1e-4, greedy tokens identical."""

import numpy as np
import pytest

from luffy.tests.helpers import PROMPT, hf_greedy, torch_logits

ATOL = 1e-4


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_zoo_decoder_parity(zoo_artifacts, name):
    artifact, model = zoo_artifacts(name)
    assert artifact.report["parity"]["passed"]
    engine = artifact.load()
    prompt = [256, *PROMPT]
    # prefill: every position's logits
    assert np.abs(engine.score([prompt]) - torch_logits(model, [prompt])).max() <= ATOL
    # decode: the logits of 32 greedy steps, and the tokens themselves
    ids, logits = engine.generate([prompt], max_new_tokens=32, min_new_tokens=32, output_logits=True)
    ref_ids, ref_logits = hf_greedy(model, prompt, 32)
    assert ids.tolist() == ref_ids.tolist()
    assert logits.shape == ref_logits.shape == (1, 32, 320)
    assert np.abs(logits - ref_logits).max() <= ATOL


def test_zoo_encoder_parity(zoo_artifacts):
    import torch

    artifact, model = zoo_artifacts("bert-tiny")
    engine = artifact.load()
    ids = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]], dtype=np.int64)
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], dtype=np.int64)
    types = np.zeros_like(ids)
    got = engine.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    assert set(got) == {"last_hidden_state", "pooler_output"}
    assert np.abs(got["last_hidden_state"] - ref.last_hidden_state.numpy()).max() <= ATOL
    assert np.abs(got["pooler_output"] - ref.pooler_output.numpy()).max() <= ATOL


def test_zoo_tokenizer_round_trip(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    engine = artifact.load()
    text = engine.generate_text("Hello, luffy", max_new_tokens=5, min_new_tokens=5)
    assert isinstance(text, str)
    ids = engine.tokenizer.encode("Hello, luffy").ids
    assert ids[0] == 256 and engine.tokenizer.decode(ids, skip_special_tokens=True) == "Hello, luffy"
    # text out is the decode of exactly the generated ids
    out = engine.generate([ids], max_new_tokens=5, min_new_tokens=5)[0, len(ids):]
    assert text == engine.tokenizer.decode(out.tolist(), skip_special_tokens=True)
