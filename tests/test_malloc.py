"""serving/malloc.py: with glibc's thresholds set, a step's freed [batch, vocab] temporaries are reused instead of
faulted in again from the kernel. Counted in page faults (getrusage), each case in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

STEPS = """
import json, resource, sys
import numpy as np
from luffy.serving.malloc import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "kept" else None
logits = np.ones((16, 32000), dtype=np.float32)
def step():  # what the sampling chain allocates per decode step: a copy, a softmax, a cumulative sum
    scores = logits / 0.7
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1)[:, -1].sum()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(case: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, case], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_freed_memory_takes_no_page_faults_per_step():
    default, kept = _faults("default"), _faults("kept")
    assert kept["took"] is True
    # default glibc: each 2 MiB temporary is a fresh mapping, faulted in page by page (~500 faults per array)
    assert default["faults"] > 50 * 500
    assert kept["faults"] < 50 * 20
