"""runtimes/huge_pages.py on real memory: what it collapses, what it leaves alone, and that tokens do not change."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from luffy.runtimes.huge_pages import (
    MIN_REGION, anonymous_mappings, back_new_mappings_with_huge_pages, huge_page_candidates,
)
from luffy.runtimes.smaps import read_mappings

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are a Linux feature here")


def _collapse_supported() -> str | None:
    if not THP.exists() or "[never]" in THP.read_text():
        return "transparent huge pages are off on this kernel"
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return None if (major, minor) >= (6, 1) else f"MADV_COLLAPSE needs Linux >= 6.1, this is {os.uname().release}"


def _anon_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address``."""
    return next((m.fields.get("AnonHugePages", 0) for m in read_mappings() if m.start <= address < m.end), 0)


def _address(buffer: mmap.mmap) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


@linux_only
def test_a_written_buffer_gets_huge_pages_and_keeps_its_contents():
    reason = _collapse_supported()
    if reason:
        pytest.skip(reason)
    before = anonymous_mappings()
    size = 3 * MIN_REGION
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    values = np.frombuffer(buffer, dtype=np.float32)
    values[:] = np.arange(values.size, dtype=np.float32)  # fully resident, like a packed weight
    assert _anon_huge_bytes(_address(buffer)) == 0

    report = back_new_mappings_with_huge_pages(before)

    assert report["regions"] >= 1 and report["refused"] == 0
    assert report["bytes"] >= size - 2 * (2 << 20)  # at most the two partial 2 MiB ends are left out
    assert _anon_huge_bytes(_address(buffer)) >= size - 2 * (2 << 20)
    np.testing.assert_array_equal(values, np.arange(values.size, dtype=np.float32))
    del values
    buffer.close()


def test_only_new_large_resident_mappings_are_candidates():
    mib = 1 << 20
    old = (100 * mib, 140 * mib)
    before = {old: 40 * mib}
    after = {
        old: 40 * mib,                              # there before: left alone
        (200 * mib, 264 * mib): 64 * mib,           # new, written in full: a weight buffer
        (300 * mib, 308 * mib): 1 * mib,            # new but mostly untouched: a thread stack
        (400 * mib, 402 * mib): 2 * mib,            # new, resident, under MIN_REGION
        (100 * mib, 150 * mib + 4096): 50 * mib,    # the old mapping grew: only its new tail counts
        (500 * mib, 520 * mib): 20 * mib,           # an old mapping...
    }
    before[(500 * mib, 518 * mib)] = 18 * mib      # ...that grew by less than MIN_REGION: left alone
    assert huge_page_candidates(before, after) == [(140 * mib, 150 * mib), (200 * mib, 264 * mib)]
    assert huge_page_candidates(after, after) == []


def test_engine_reports_huge_pages_and_generates_the_same_tokens(zoo_artifacts):
    import luffy

    artifact, _ = zoo_artifacts("llama-tiny")
    prompt = [[256, 72, 105, 33, 9], [256, 72]]
    plain = luffy.load(artifact.path, huge_pages=False)
    backed = luffy.load(artifact.path)

    assert plain.huge_pages is None
    assert set(backed.huge_pages) == {"bytes", "regions", "refused", "seconds"}
    np.testing.assert_array_equal(
        backed.generate(prompt, max_new_tokens=12, eos_token_id=None),
        plain.generate(prompt, max_new_tokens=12, eos_token_id=None),
    )
