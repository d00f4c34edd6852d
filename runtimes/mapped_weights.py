"""Give back the pages of an artifact's weight file that ONNX Runtime read while loading and no longer needs.

Why luffy does this itself: ORT memory-maps external initializers. A weight that a kernel prepacks (every
MatMulNBits weight) is copied into ORT's own buffer, and its mapping is released, unless another node reads
the same initializer: a tied embedding's GatherBlockQuantized reads the lm_head's codes. That mapping stays,
and every page of it that the head's prepacking read stays resident, although the gather later reads only
the rows of the tokens it sees: 131 MB at the 1B shape (int4, block 128), 166 MiB at block 32 (measured with
/proc/self/smaps after loading). ORT has no option for it. So after the session is built the engine asks the
kernel to drop the resident pages of its mappings of the artifact's own files (``MADV_DONTNEED``), those in
which no page was ever written: such a page holds nothing that is not in the file, so dropping it loses
nothing, and a later read faults it back in from the page cache (or the disk). Off Linux, or where madvise fails, memory stays as it was.
"""

from __future__ import annotations

from pathlib import Path

from .huge_pages import _madvise
from .smaps import maps_anything_under, read_mappings

MADV_DONTNEED = 4
NOTHING_RELEASED = {"bytes": 0, "mappings": 0}


def file_mappings(directory: Path) -> list[tuple[int, int, int, int]]:
    """(start, end, resident bytes, written bytes) of this process's private mappings of files under ``directory``.

    ORT maps external data read-write and private: "written" counts the pages a write made private copies of
    (smaps' ``Anonymous``), which hold what the file does not.
    """
    root = str(Path(directory).resolve()) + "/"
    if not maps_anything_under(root):  # an artifact whose weights live inside model.onnx maps nothing of its own
        return []
    return [(m.start, m.end, m.fields.get("Rss", 0), m.fields.get("Anonymous", 0))
            for m in read_mappings() if m.path.startswith(root)]


def release_file_pages(directory: Path) -> dict:
    """Drop the resident pages of the read-only mappings of files under ``directory``: what was released.

    >>> engine = luffy.load("build/llama-int4")      # doctest: +SKIP
    >>> release_file_pages(engine.path)["bytes"]      # doctest: +SKIP
    137363456
    """
    # a mapping with a written page is left whole: dropping that page would bring the file's bytes back
    mappings = [m for m in file_mappings(directory) if m[2] > 0 and m[3] == 0]
    if not mappings:
        return dict(NOTHING_RELEASED)
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        return dict(NOTHING_RELEASED)
    report = dict(NOTHING_RELEASED)
    for start, end, resident, _ in mappings:
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            report["bytes"] += resident
            report["mappings"] += 1
    return report
