"""runtimes/smaps.py against memory this test maps and touches itself: the ranges, paths, permissions and
sizes the kernel reports are the ones the helpers (huge_pages, mapped_weights, kv_memory) filter."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from luffy.runtimes.smaps import maps_anything_under, read_mappings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
PAGE = mmap.PAGESIZE


def _holding(address: int):
    return next(m for m in read_mappings() if m.start <= address < m.end)


def test_an_anonymous_mapping_counts_exactly_the_pages_written():
    buffer = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)  # one 2 MiB page would make Rss the whole mapping
    address = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    before = _holding(address)
    assert (before.start, before.end) == (address, address + 64 * PAGE)
    assert before.private_anonymous and before.perms == "rw-p" and before.path == ""
    assert before.fields["Rss"] == 0
    for page in (0, 5, 63):
        buffer[page * PAGE] = 1
    after = _holding(address)
    assert after.fields["Rss"] == 3 * PAGE and after.fields["Anonymous"] == 3 * PAGE


def test_a_file_mapping_has_its_path_even_with_spaces_and_is_not_anonymous(tmp_path):
    path = tmp_path / "weights with spaces.bin"
    path.write_bytes(bytes(range(256)) * (4 * PAGE // 256))
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        address = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
        assert mapped[PAGE] == 0  # read one page: resident, never written
        found = _holding(address)
        assert found.path == str(path) and not found.private_anonymous and found.perms.startswith("r--")
        assert PAGE <= found.fields["Rss"] <= 4 * PAGE and found.fields["Anonymous"] == 0
        # the cheap /proc/self/maps check that lets an engine skip smaps when it maps none of its files
        assert maps_anything_under(str(tmp_path) + "/")
        assert not maps_anything_under(str(tmp_path / "elsewhere") + "/")


def test_mappings_are_in_address_order_and_do_not_overlap():
    mappings = read_mappings()
    assert len(mappings) > 10 and any(m.path == "[stack]" for m in mappings)
    assert all(a.end <= b.start for a, b in zip(mappings, mappings[1:]))
    assert all("Rss" in m.fields and "Size" in m.fields for m in mappings)
