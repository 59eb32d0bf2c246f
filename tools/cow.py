"""Where a forked process's private memory is: its pages that are no longer the parent's, per mapping.

    python tools/cow.py CHILD_PID PARENT_PID    # e.g. a shim server and the zygote it was forked from

Root only (page frame numbers in /proc/PID/pagemap). For each mapping of the child (grouped by name:
anonymous, [heap], each library's segments), resident pages are counted as *shared* (the same frame as
the parent's at that address), *copied* (a different frame: one of the two wrote to it after the fork)
or *new* (the parent has nothing resident there). A server's private memory is its copied and new pages;
for a zygote-forked shim nearly all of it is copied: reference counts and caches written on objects
the zygote built, 4 KiB per page touched. Also prints smaps' Pss and Private_Dirty per group.
"""

from __future__ import annotations

import argparse
import collections
import re
import struct
import sys

PAGE = 4096
_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def mappings(pid: int) -> list[tuple[int, int, str, dict[str, int]]]:
    """(start, end, group name, smaps fields in kB) for each mapping."""
    out: list[tuple[int, int, str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _RANGE.match(line)
            if m:
                name = m.group(4).strip()
                group = name if name.startswith("[") else (name.rsplit("/", 1)[-1] + " " + m.group(3)
                                                            if name else "anonymous")
                out.append((int(m.group(1), 16), int(m.group(2), 16), group, {}))
            elif out and line.split(":")[0] in ("Pss", "Private_Dirty"):
                out[-1][3][line.split(":")[0]] = int(line.split()[1])
    return out


def frames(pid: int, start: int, end: int) -> list[int | None]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read((end - start) // PAGE * 8)
    return [e & ((1 << 55) - 1) if e >> 63 else None for (e,) in struct.iter_unpack("<Q", data)]


def compare(child: int, parent: int) -> dict[str, collections.Counter]:
    parent_maps = [(lo, hi) for lo, hi, _, _ in mappings(parent)]
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for lo, hi, group, fields in mappings(child):
        mine = frames(child, lo, hi)
        theirs: list[int | None] = [None] * len(mine)
        for plo, phi in parent_maps:
            a, b = max(lo, plo), min(hi, phi)
            if a < b:
                theirs[(a - lo) // PAGE:(b - lo) // PAGE] = frames(parent, a, b)
        counts = groups[group]
        for frame, other in zip(mine, theirs, strict=True):
            if frame is not None:
                counts["new" if other is None else "shared" if other == frame else "copied"] += 1
        counts["pss_kb"] += fields.get("Pss", 0)
        counts["private_dirty_kb"] += fields.get("Private_Dirty", 0)
    return groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("child", type=int)
    p.add_argument("parent", type=int)
    p.add_argument("--top", type=int, default=15, help="groups to list (default 15)")
    args = p.parse_args(argv)
    groups = compare(args.child, args.parent)
    total: collections.Counter = collections.Counter()
    for counts in groups.values():
        total.update(counts)
    print(f"{'mapping':44} {'shared':>8} {'copied':>8} {'new':>8} {'Pss':>8} {'PrivDirty':>9}  (KiB)")
    rows = sorted(groups.items(), key=lambda kv: -(kv[1]["copied"] + kv[1]["new"]))[:args.top]
    for name, c in [*rows, ("total", total)]:
        print(f"{name[:44]:44} {c['shared'] * 4:8} {c['copied'] * 4:8} {c['new'] * 4:8} "
              f"{c['pss_kb']:8} {c['private_dirty_kb']:9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
