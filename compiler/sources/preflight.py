"""Before the work: will the artifact fit on the disk, and the compile in memory?

A checkpoint's safetensors headers give every tensor's shape, so the artifact's size and the compile's peak
memory can be estimated before a byte of weight is read. An estimate above what the output's filesystem has
free, or above ``--max-memory`` (default: what the machine has available now), is refused in one line naming
both numbers, before minutes of work and without a half-written artifact.

Memory, from measured compiles (docs/large-models.md):
  streamed   BASE_BYTES (libraries, the graph, ONNX Runtime's check of one layer) plus the largest tensor's
             read: its checkpoint bytes and its fp32 copy (1.5x the tensor in fp32 for bf16 checkpoints), or
             for a quantized tensor, a 64 MB slice and its codes
  whole      the model in fp32 in PyTorch, again in the exported graph, and the transforms of the passes:
             WHOLE_MODEL_FACTOR x the fp32 weights
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ..config import parse_size

BASE_BYTES = 2 << 30
WHOLE_MODEL_FACTOR = 2.5  # measured 2.3x on Llama-3.2-1B (11.3 GB for 4.9 GB of fp32 weights), plus margin
CHUNK_BYTES = 64 << 20  # passes/weight_codes.py's slice
MARGIN = 1.05  # rotary tables, norms, the graph itself
GB = 1 << 30


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
             streamed: bool) -> Estimate:
    """The artifact's size and the compile's peak memory for tensors of ``shapes`` (one per checkpoint tensor,
    ``source_bytes`` their size on disk)."""
    artifact = int(MARGIN * sum(_stored_bytes(s, precision, block) for s in shapes))
    params = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    fp32 = [4 * int(np.prod(s, dtype=np.int64)) for s in shapes]
    if not streamed:
        memory = BASE_BYTES + int(WHOLE_MODEL_FACTOR * sum(fp32))
        how = f"whole model: {WHOLE_MODEL_FACTOR}x its {sum(fp32) / GB:.1f} GB of fp32 weights"
    elif precision in ("int4", "int8"):
        largest = max(_stored_bytes(s, precision, block) for s in shapes)
        memory = BASE_BYTES + int(largest + 3 * CHUNK_BYTES)
        how = f"streamed: one quantized tensor at a time (largest {largest / GB:.2f} GB of codes)"
    else:
        index = int(np.argmax(fp32))
        memory = BASE_BYTES + fp32[index] + source_bytes[index]
        how = f"streamed: one tensor at a time (largest {fp32[index] / GB:.2f} GB in fp32)"
    return Estimate(artifact, memory, params, how)


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
                     cfg.block_size or SMALLEST_CHOSEN_BLOCK, streamed)
    check_room(found, output, cfg.max_memory)
    return found
