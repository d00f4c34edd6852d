"""LuffyOptimizer: an in-memory transformers model in, transformers-style generate out."""

import numpy as np
import pytest
import torch

import luffy
from luffy import LuffyConfig, LuffyOptimizer
from luffy.tests.helpers import NAMED_FAMILIES


@pytest.fixture(scope="module")
def hf_model_and_tokenizer():
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from luffy.models_zoo.byte_tokenizer import byte_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **NAMED_FAMILIES["qwen2"])).eval()
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(add_bos=False), pad_token="<pad>")
    return model, tok


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_matches_transformers(hf_model_and_tokenizer, side):
    model, tok = hf_model_and_tokenizer
    optimized = LuffyOptimizer(model=model, config=LuffyConfig(optimization_level="balanced")).optimize()
    tok.padding_side = side
    inputs = tok(["short", "a longer prompt"], return_tensors="pt", padding=True)
    ids = optimized.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64
    tok.padding_side = "left"
    left = tok(["short", "a longer prompt"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**left, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ids[:, -16:].tolist() == ref[:, -16:].tolist()


def test_report_and_levels(hf_model_and_tokenizer, tmp_path):
    model, _ = hf_model_and_tokenizer
    optimized = LuffyOptimizer(model=model, config=LuffyConfig(optimization_level="conservative"),
                               output_dir=tmp_path / "art").optimize()
    report = optimized.get_optimization_report()
    assert report["parity"]["passed"] and [p["name"] for p in report["passes"]][:2] == ["inline", "fold-constants"]
    assert luffy.load(tmp_path / "art").manifest["opt_level"] == 1
    sampled = optimized.generate(input_ids=np.array([[1, 2, 3]]), max_new_tokens=5, do_sample=True, temperature=0.7,
                                 top_p=0.9, seed=0)
    assert isinstance(sampled, np.ndarray) and sampled.shape == (1, 8)


def test_temporary_artifact_is_removed_with_the_model(hf_model_and_tokenizer):
    import gc

    model, _ = hf_model_and_tokenizer
    optimized = LuffyOptimizer(model=model, config=LuffyConfig(optimization_level="balanced", check_parity=False)).optimize()
    path = optimized.artifact_path
    assert path.is_dir() and optimized.manifest["opt_level"] == 2
    del optimized
    gc.collect()
    assert not path.exists()


def test_bad_level_is_refused():
    with pytest.raises(luffy.UsageError, match="optimization_level 'fastest'"):
        LuffyConfig(optimization_level="fastest")
