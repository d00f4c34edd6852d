"""A request's output in a batch against alone: the probe of this CPU's weight kernels (runtimes/batch_invariance.py).

The probe's verdict must hold at model sizes (the kernels benchmark's check on a 2048 x 2048 weight) and predict
what a compiled int4 artifact does: rows decoded together give the logits each gives alone, bit for bit, exactly
when the probe calls its kernels invariant. Which settings are invariant depends on the CPU, so the tests assert
the agreement, never a fixed table.
"""

from __future__ import annotations

import numpy as np
import pytest

import luffy
from luffy.errors import UsageError
from luffy.benchmarks.kernels import matmul_nbits
from luffy.runtimes.batch_invariance import (artifact_kernels, nbits_batch_invariant, rows_match_alone,
                                             variance_warning)

PROMPTS = [list(b"def parse("), list(b"Return the"), list(b"class Foo:\n")]


@pytest.mark.parametrize("bits, block, accuracy, symmetric", [(4, 32, 4, False), (4, 128, 4, False),
                                                               (8, 128, 4, True), (4, 32, 0, False)])
def test_the_probe_agrees_with_the_kernel_at_model_size(bits, block, accuracy, symmetric):
    w = (np.random.default_rng(0).standard_normal((2048, 2048)) * 0.05).astype(np.float32)
    session, _ = matmul_nbits(w, bits, block, symmetric, accuracy)
    assert nbits_batch_invariant(bits, block, accuracy, symmetric) == rows_match_alone(session, 2048)


def _one_matmul(k: int = 256, n: int = 64):
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape([1, k]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.zeros((k, n), np.float32)), shape=ir.Shape([k, n]),
                 type=ir.TensorType(ir.DataType.FLOAT))
    matmul = ir.node("MatMul", [x, w], name="mm")
    return ir.Model(ir.Graph([x], matmul.outputs, nodes=[matmul], initializers=[w], opset_imports={"": 20}),
                    ir_version=10)


@pytest.mark.parametrize("precision, bits", [("int8", 8), ("int4", 4)])
def test_batch_invariant_picks_the_largest_block_the_probe_passes_for_the_precisions_own_kernels(precision, bits):
    # int8 and int4 have their own default blocks and their own verdicts (int8 block 64 can be invariant where
    # int4's is not): --batch-invariant must probe the kernels the compile will write
    from luffy.compiler.config import LuffyConfig
    from luffy.compiler.quality.quality_measure import kernel_choice
    from luffy.runtimes.cpu_features import weight_kernels

    cfg = LuffyConfig(precision=precision, batch_invariant=True)
    plan = weight_kernels(bits=bits)
    candidates = [b for b in (128, 64, 32, 16) if b <= plan["block_size"]]
    invariant = [b for b in candidates if nbits_batch_invariant(bits, b, plan["accuracy_level"], bits == 8)]
    if not invariant:
        with pytest.raises(UsageError, match=f"no int{bits} block"):
            kernel_choice(cfg, _one_matmul(), bits)
        return
    block, accuracy, chosen_for = kernel_choice(cfg, _one_matmul(), bits)
    assert (block, accuracy) == (invariant[0], plan["accuracy_level"]) and "--batch-invariant" in chosen_for["why"]


# block 128 is luffy's default int4 where MLAS has int8 kernels; --batch-invariant picks the largest block the probe
# calls invariant (block 32 on the CPUs measured), so the two cover both verdicts wherever the suite runs
VARIANTS = {"block128": dict(block_size=128), "batch-invariant": dict(batch_invariant=True)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def int4_engine(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    try:
        return luffy.compile("llama-pydoc", output=out, precision="int4", **VARIANTS[request.param]).load()
    except UsageError as exc:  # --batch-invariant on a CPU where no block is: the error must be the probe's verdict
        assert request.param == "batch-invariant" and "--batch-invariant: no int4 block" in str(exc)
        assert not any(nbits_batch_invariant(4, b, 4, False) for b in (128, 64, 32, 16))
        return None


def _greedy_steps(slots, rows: int, first: list[int], steps: int) -> np.ndarray:
    """``steps`` greedy decode steps of ``rows`` slots together from tokens ``first``: logits [rows, steps, vocab]."""
    current, logits = list(first), []
    for _ in range(steps):
        step = slots.step(0, rows, np.array([[t] for t in current]))[:, -1].copy()
        logits.append(step)
        current = [int(np.argmax(row)) for row in step]
    return np.stack(logits, axis=1)


def _decode_together_and_alone(engine, steps: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decode of PROMPTS in one batch (each prefilled in its own slot, as alone) and of each alone:
    every step's logits, [prompt, step, vocab] each."""
    together = engine.open_slots(len(PROMPTS), 64)
    first = [int(np.argmax(together.step(r, r + 1, np.array([p]))[0, -1])) for r, p in enumerate(PROMPTS)]
    alone = []
    for prompt, token in zip(PROMPTS, first):
        slots = engine.open_slots(1, 64)
        assert int(np.argmax(slots.step(0, 1, np.array([prompt]))[0, -1])) == token
        alone.append(_greedy_steps(slots, 1, [token], steps)[0])
    return _greedy_steps(together, len(PROMPTS), first, steps), np.stack(alone)


def test_batched_rows_equal_alone_exactly_when_the_probe_says_so(int4_engine, request):
    if int4_engine is None:
        pytest.skip("no batch-invariant int4 block on this CPU (the fixture checked the error against the probe)")
    kernels = artifact_kernels(int4_engine.manifest)
    if request.node.callspec.params["int4_engine"] == "batch-invariant":
        assert all(k["batch_invariant"] for k in kernels), kernels
        assert "--batch-invariant" in int4_engine.manifest["report"]["precision"]["scheme"]["chosen_for"]["why"]
    assert kernels and {k["bits"] for k in kernels} == {4}
    invariant = all(k["batch_invariant"] for k in kernels)
    together, alone = _decode_together_and_alone(int4_engine)
    # an odd batch (3 rows) decoding: the kernels' one-row and two-row paths both run
    same = np.array_equal(together, alone)
    assert same == invariant, (kernels, float(np.abs(together - alone).max()))
    assert (variance_warning(int4_engine.manifest) is None) == invariant


def test_artifacts_without_weight_kernels_have_nothing_to_say(engine):
    assert artifact_kernels(engine.manifest) == [] and variance_warning(engine.manifest) is None
