"""This process's memory mappings as the kernel reports them in /proc/self/smaps (Linux; empty elsewhere).

One reader for the three runtime helpers that ask the kernel what is resident: huge_pages (which anonymous
mappings are new and full), mapped_weights (which file mappings of an artifact hold read, never-written
pages) and kv_memory (how much of a reserved KV buffer is backed). Each filters the same list.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

SMAPS = "/proc/self/smaps"
MAPS = "/proc/self/maps"


class Mapping(NamedTuple):
    """One mapping: its address range, permissions (``rw-p``), backing path ("" for anonymous memory, or a
    pseudo-name such as ``[heap]``) and its size fields in bytes (``Rss``, ``Anonymous``, ``AnonHugePages``...)."""

    start: int
    end: int
    perms: str
    path: str
    fields: dict[str, int]

    @property
    def private_anonymous(self) -> bool:
        """Private, writable memory no file backs; malloc serves mid-sized buffers from the brk heap, so
        ``[heap]`` counts too."""
        return self.path in ("", "[heap]") and self.perms.startswith("rw") and self.perms.endswith("p")


def read_mappings() -> list[Mapping]:
    """Every mapping of this process, in address order; [] off Linux or when smaps cannot be read.

    >>> [m.fields["Rss"] for m in read_mappings() if m.path == "[heap]"]   # doctest: +SKIP
    [1327104]
    """
    if not sys.platform.startswith("linux"):
        return []
    mappings: list[Mapping] = []
    try:
        with open(SMAPS) as smaps:
            for line in smaps:
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # header: range perms offset dev inode [path]
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    path = head[5].rstrip("\n") if len(head) == 6 else ""
                    mappings.append(Mapping(start, end, head[1], path, {}))
                elif mappings and len(head) == 3 and head[2] == "kB":  # a size field: "Rss:   4 kB"
                    mappings[-1].fields[head[0].rstrip(":")] = int(head[1]) * 1024
    except OSError:
        return []
    return mappings


def maps_anything_under(root: str) -> bool:
    """Whether any mapping's backing path starts with ``root``, from /proc/self/maps: a line per mapping and no
    page-table walk, where smaps costs ~40 ms in a process that has torch loaded (thousands of mappings), which a
    caller with nothing of its own mapped need not pay. True off Linux or when maps cannot be read (so the
    caller reads smaps and finds what it finds)."""
    try:
        with open(MAPS) as maps:
            return any(line.split(maxsplit=5)[-1].startswith(root) for line in maps)
    except OSError:
        return True
