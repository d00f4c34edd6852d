"""Before the work: will the artifact fit on the disk, and the compile in memory?

A checkpoint's safetensors headers give every tensor's shape, so the artifact's size and the compile's peak
memory can be estimated before a byte of weight is read. An estimate above what the output's filesystem has
free, or above ``--max-memory`` (default: what the machine has available now), is refused in one line naming
both numbers, before minutes of work and without a half-written artifact.

Memory, from measured compiles (docs/large-models.md), the largest of the phases the compile runs:
  streamed   write: BASE_BYTES (libraries, the graph) plus the largest tensor's read: its checkpoint bytes and
             its fp32 copy, or for a quantized tensor, a 64 MB slice and its codes;
             parity check: CHECK_BASE_BYTES plus the largest tensor three times: the reference module's fp32
             copy, its checkpoint bytes (mapped) and the artifact's region holding it (the peak of the streamed
             1B and 8B compiles: their embedding table, 2.49 and 4.39 GB);
             GPTQ (--calib): BASE_BYTES plus the float64 Hessians of two layers (the region being written and
             the one collected next) and GPTQ's three K x K working copies for the widest input (from the
             algorithm in passes/gptq.py and stream/calibration.py; not measured at 8B)
             KV scales (--kv-cache-dtype int8/int4): BASE_BYTES plus one region's session (the largest layer's
             weights as stored and the largest tensor outside the layers: embedding or head) or the largest
             tensor's write, whichever is larger, plus the calibration windows' hidden states (two per token)
             and one window's logits; with GPTQ also its Hessians, whose runner is live at the same time (from
             stream/calibration.py and regions.py; not measured at scale)
  whole      the model in fp32 in PyTorch, again in the exported graph, and the transforms of the passes:
             WHOLE_MODEL_FACTOR x the fp32 weights
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..config import CALIBRATED_KV, parse_size
from ..quality.calibration import MAX_CALIB_WINDOWS, WINDOW

BASE_BYTES = 2 << 30
# the check phase's peak less its largest module's three copies: 0.77 GB (1B) and 0.94 GB (8B) measured
# (benchmarks/results/scale-{1b,8b}-int4-shared-machine.json), plus margin
CHECK_BASE_BYTES = 3 << 29
WHOLE_MODEL_FACTOR = 2.5  # measured 2.3x on Llama-3.2-1B (11.3 GB for 4.9 GB of fp32 weights), plus margin
CHUNK_BYTES = 64 << 20  # passes/weight_codes.py's slice
MARGIN = 1.05  # rotary tables, norms, the graph itself
GB = 1 << 30
KV_CALIB_WINDOW = WINDOW
KV_CALIB_TOKENS = MAX_CALIB_WINDOWS * WINDOW  # the most tokens --kv-calib / --calib runs (fewer for a short file)


@dataclass(frozen=True)
class Estimate:
    artifact_bytes: int
    memory_bytes: int
    parameters: int
    how: str  # what the memory estimate is made of, for the message and the report

    def to_json(self) -> dict:
        return {"artifact_bytes": self.artifact_bytes, "memory_bytes": self.memory_bytes, "parameters": self.parameters,
                "memory_model": self.how}


# without --block-size the compiling CPU picks the block (quality_measure.kernel_choice); the smallest it picks
# stores the most scales, so the estimate holds whichever it is
SMALLEST_CHOSEN_BLOCK = 32


def _stored_bytes(shape: tuple[int, ...], precision: str, block: int) -> float:
    count = int(np.prod(shape, dtype=np.int64))
    if len(shape) != 2 or precision in ("fp32",):
        return 4.0 * count
    if precision in ("fp16", "bf16"):
        return 2.0 * count
    bits = 4 if precision == "int4" else 8
    return count * (bits / 8 + 4 / block + bits / 8 / block)  # codes, fp32 scales, packed zero points


def estimate(shapes: list[tuple[int, ...]], source_bytes: list[int], precision: str, block: int,
             streamed: bool, names: list[str] | None = None, parity: bool = True, calib: bool = False,
             kv_calib: bool = False, head_bits: int | None = None) -> Estimate:
    """The artifact's size and the compile's peak memory for tensors of ``shapes`` (one per checkpoint tensor,
    ``names`` their names, ``source_bytes`` their size on disk): the largest of the phases the compile runs.
    ``calib``: GPTQ on --calib (int4/int8 weights); ``kv_calib``: an int8/int4 KV cache's scales calibrated;
    ``head_bits``: --lm-head-bits.

    Example::

        >>> estimate([(128256, 2048)], [128256 * 2048 * 2], "int4", 32, streamed=True).how
        'streamed: the parity check holds the largest tensor (0.98 GB in fp32) three times'
    """
    stored = _stored_sizes(shapes, precision, block, head_bits)
    artifact = int(MARGIN * sum(stored))
    params = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    fp32 = [4 * int(np.prod(s, dtype=np.int64)) for s in shapes]
    if not streamed:
        memory = BASE_BYTES + int(WHOLE_MODEL_FACTOR * sum(fp32))
        return Estimate(artifact, memory, params, f"whole model: {WHOLE_MODEL_FACTOR}x its {sum(fp32) / GB:.1f} GB "
                                                  "of fp32 weights")
    phases = [_write_phase(stored, source_bytes, fp32, precision)]
    if parity:
        phases.append(_check_phase(stored, source_bytes, fp32))
    gptq = calib and precision in ("int4", "int8")
    if gptq:
        phases.append(_gptq_phase(shapes, names or [""] * len(shapes)))
    if kv_calib:
        phases.append(_kv_phase(shapes, stored, source_bytes, fp32, precision, names or [""] * len(shapes), gptq))
    memory, how = max(phases)
    return Estimate(artifact, memory, params, f"streamed: {how}")


def _stored_sizes(shapes, precision: str, block: int, head_bits: int | None) -> list[float]:
    """Each tensor's bytes in the artifact. With ``head_bits`` the 2-D tensors with the most rows (the [vocab,
    hidden] head and embedding; a tied head's table is both) are counted at those bits: an upper bound where the
    embedding is not tied and keeps the weights' bits."""
    rows = max((s[0] for s in shapes if len(s) == 2), default=None)
    head = {4: "int4", 8: "int8"}.get(head_bits, precision) if precision in ("int4", "int8") else precision
    return [_stored_bytes(s, head if len(s) == 2 and s[0] == rows else precision, block) for s in shapes]


def _write_phase(stored, source_bytes, fp32, precision) -> tuple[int, str]:
    if precision in ("int4", "int8"):
        largest = max(stored)
        return BASE_BYTES + int(largest + 3 * CHUNK_BYTES), \
            f"one quantized tensor at a time (largest {largest / GB:.2f} GB of codes)"
    index = int(np.argmax(fp32))
    return BASE_BYTES + fp32[index] + source_bytes[index], \
        f"one tensor at a time (largest {fp32[index] / GB:.2f} GB in fp32)"


def _check_phase(stored, source_bytes, fp32) -> tuple[int, str]:
    index = int(np.argmax(fp32))
    held = fp32[index] + source_bytes[index] + int(stored[index])
    return CHECK_BASE_BYTES + held, \
        f"the parity check holds the largest tensor ({fp32[index] / GB:.2f} GB in fp32) three times"


def _gptq_phase(shapes, names) -> tuple[int, str]:
    """Two layers of float64 Hessians (one per quantized input, counted per weight: an upper bound where
    weights share an input), one more widest-input matrix while a Hessian is factored (passes/gptq.py: its reversed
    copy, which becomes the factor in the Hessian's place), and a float64 working copy of a 64 MB weight slice."""
    first = [s for s, n in zip(shapes, names) if len(s) == 2 and _layer(n) == 0] or [s for s in shapes if len(s) == 2]
    widest = max(s[1] for s in first)
    layer = sum(8 * s[1] * s[1] for s in first)
    return BASE_BYTES + 2 * layer + 8 * widest * widest + 3 * CHUNK_BYTES, \
        f"GPTQ holds two layers of Hessians ({2 * layer / GB:.2f} GB) and works on a {widest}-wide one"


def _kv_phase(shapes, stored, source_bytes, fp32, precision, names, gptq: bool) -> tuple[int, str]:
    """The KV scales' calibration (stream/calibration.layer_kv_ranges): the regions run one at a time, each written
    to a scratch file one tensor at a time and then loaded; the windows' values that cross regions are held."""
    by_layer: dict[int, float] = {}
    for size, name in zip(stored, names):
        if _layer(name) is not None:
            by_layer[_layer(name)] = by_layer.get(_layer(name), 0.0) + size
    outside = [i for i, n in enumerate(names) if _layer(n) is None and len(shapes[i]) == 2] or \
        [int(np.argmax(stored))]
    table = max(outside, key=lambda i: stored[i])  # the embedding (or head): [vocab, hidden]
    region = max(by_layer.values(), default=0.0) + stored[table]
    write = _write_phase(stored, source_bytes, fp32, precision)[0] - BASE_BYTES
    vocab, hidden = shapes[table][0], shapes[table][-1]
    held = 2 * 4 * hidden * KV_CALIB_TOKENS + 4 * vocab * KV_CALIB_WINDOW
    memory, how = BASE_BYTES + int(max(region, write)) + held, \
        f"the KV calibration holds one region ({region / GB:.2f} GB) and the windows' hidden states ({held / GB:.2f} GB)"
    if gptq:
        hessians = _gptq_phase(shapes, names)[0] - BASE_BYTES
        memory, how = memory + hessians + held, f"{how}, and GPTQ's Hessians and working copies ({hessians / GB:.2f} GB) " \
            "beside a second runner's windows"
    return memory, how


def _layer(name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to (``model.layers.3.mlp...`` -> 3), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def available_memory() -> int | None:
    """What the machine can give now (MemAvailable), or None where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_room(found: Estimate, output: Path, max_memory: str | None) -> None:
    """Refuse, naming the numbers, a compile whose artifact would not fit on disk or whose estimate exceeds the
    memory limit."""
    parent = Path(output).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if found.artifact_bytes > free:
        raise UsageError(f"{output}: the artifact needs about {found.artifact_bytes / GB:.1f} GB but {parent} has "
                         f"{free / GB:.1f} GB free")
    limit = parse_size(max_memory, "--max-memory") if max_memory is not None else available_memory()
    if limit is not None and found.memory_bytes > limit:
        where = f"--max-memory is {max_memory}" if max_memory is not None else \
            f"the machine has {limit / GB:.1f} GB available (set --max-memory to override)"
        raise UsageError(f"this compile needs about {found.memory_bytes / GB:.1f} GB of memory ({found.how}) but "
                         f"{where}")


def check_checkpoint(checkpoint, cfg, output: Path, streamed: bool) -> Estimate:
    """Estimate a compile of ``checkpoint`` (a stream.checkpoint.Checkpoint: headers only) and refuse it when it
    does not fit; the estimate goes into the report."""
    entries = list(checkpoint.entries.values())
    found = estimate([e.shape for e in entries], [e.nbytes for e in entries], cfg.precision,
                     cfg.block_size or SMALLEST_CHOSEN_BLOCK, streamed, names=list(checkpoint.entries),
                     parity=cfg.check_parity, calib=cfg.calib is not None,
                     kv_calib=cfg.kv_cache_dtype in CALIBRATED_KV, head_bits=cfg.lm_head_bits)
    check_room(found, output, cfg.max_memory)
    return found
