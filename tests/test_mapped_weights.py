"""runtimes/mapped_weights.py: the weight file's pages ORT no longer needs go back to the kernel, and only those."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

import luffy
from luffy.runtimes.mapped_weights import file_mappings, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

PAGES = 64


def _mapped(path, write: bool = False) -> mmap.mmap:
    """The file mapped as ONNX Runtime maps external data (private, read-write), every page read."""
    with open(path, "r+b") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    assert sum(mapping[i * mmap.PAGESIZE] for i in range(PAGES)) >= 0  # fault every page in
    if write:
        mapping[0] = 255  # a private copy of one page: the mapping now holds something the file does not
    return mapping


def _resident(directory) -> list[tuple[int, int]]:
    return [(resident, written) for _, _, resident, written in file_mappings(directory)]


def test_read_pages_are_released_and_read_back_the_same(tmp_path):
    data = np.arange(PAGES * mmap.PAGESIZE, dtype=np.uint8)
    (tmp_path / "model.onnx.data").write_bytes(data.tobytes())
    mapping = _mapped(tmp_path / "model.onnx.data")
    assert _resident(tmp_path) == [(PAGES * mmap.PAGESIZE, 0)]
    report = release_file_pages(tmp_path)
    assert report == {"bytes": PAGES * mmap.PAGESIZE, "mappings": 1}
    assert _resident(tmp_path) == [(0, 0)]
    assert np.array_equal(np.frombuffer(mapping, dtype=np.uint8), data)  # faulted back in from the file
    mapping.close()


def test_a_mapping_with_a_written_page_is_left_whole(tmp_path):
    (tmp_path / "model.onnx.data").write_bytes(bytes(PAGES * mmap.PAGESIZE))
    mapping = _mapped(tmp_path / "model.onnx.data", write=True)
    assert release_file_pages(tmp_path) == {"bytes": 0, "mappings": 0}
    assert mapping[0] == 255 and _resident(tmp_path)[0][0] == PAGES * mmap.PAGESIZE
    mapping.close()


def test_files_outside_the_directory_are_not_touched(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.onnx.data").write_bytes(bytes(PAGES * mmap.PAGESIZE))
    mapping = _mapped(tmp_path / "b" / "model.onnx.data")
    assert release_file_pages(tmp_path / "a") == {"bytes": 0, "mappings": 0}
    assert _resident(tmp_path / "b") == [(PAGES * mmap.PAGESIZE, 0)]
    mapping.close()
