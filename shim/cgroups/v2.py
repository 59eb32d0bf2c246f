"""cgroup v2 → io.containerd.cgroups.v2.Metrics, filled as github.com/containerd/cgroups/v2's
Manager.Stat fills it. One difference: cpu.stat is read whether or not the cpu controller is enabled
(the kernel keeps usage_usec/user_usec/system_usec there regardless; Go reports zeros then)."""

from __future__ import annotations

import os

from shim.api.cgroups.v2 import metrics_pb2 as pb
from shim.cgroups._parse import U64_MAX, hugepage_order, parse_kv, parse_uint, read_text
from shim.cgroups.paths import CgroupError, CgroupV2

_IO_KEYS = ("rbytes", "wbytes", "rios", "wios")
# MemoryStat fields that come from their own files; every other field is a memory.stat key.
_MEMORY_FILES = {"usage": "memory.current", "usage_limit": "memory.max", "swap_usage": "memory.swap.current",
                 "swap_limit": "memory.swap.max"}


def metrics(cg: CgroupV2) -> pb.Metrics:
    path = cg.path
    if not os.path.isdir(path):
        raise CgroupError(f"cgroup {path} was deleted")
    m = pb.Metrics()
    m.pids.current = _single(path, "pids.current")
    m.pids.limit = _single(path, "pids.max")
    cpu = _kv(path, "cpu.stat")
    for field in m.cpu.DESCRIPTOR.fields:
        setattr(m.cpu, field.name, cpu.get(field.name, 0))
    memory = _kv(path, "memory.stat")
    for field in m.memory.DESCRIPTOR.fields:
        if field.name in _MEMORY_FILES:
            value = _single(path, _MEMORY_FILES[field.name])
        else:
            value = memory.get(field.name, 0)
        setattr(m.memory, field.name, value)
    events = _kv(path, "memory.events")
    if events:  # Go leaves memory_events unset when the file is missing or empty
        for field in m.memory_events.DESCRIPTOR.fields:
            setattr(m.memory_events, field.name, events.get(field.name, 0))
    m.io.SetInParent()  # Go always sends io and rdma, even empty; rdma is not read (no RDMA here)
    m.io.usage.extend(_io_stat(read_text(os.path.join(path, "io.stat")) or ""))
    m.rdma.SetInParent()
    _hugetlb(m, path)
    return m


def _kv(path: str, name: str) -> dict[str, int]:
    text = read_text(os.path.join(path, name))
    return {} if text is None else parse_kv(text, strict=False)


def _single(path: str, name: str) -> int:
    """A one-value file: "max" is the largest uint64, a missing or unreadable value 0."""
    text = read_text(os.path.join(path, name))
    if text is None:
        return 0
    text = text.strip()
    if text == "max":
        return U64_MAX
    try:
        return parse_uint(text)
    except ValueError:
        return 0


def _io_stat(text: str) -> list[pb.IOEntry]:
    """io.stat lines: "MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N"."""
    entries = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 2:
            continue
        majmin = parts[0].split(":")
        if len(majmin) != 2:
            continue
        if not (_digits(majmin[0]) and _digits(majmin[1])):
            break  # as Go: a bad device number ends the list
        entry = pb.IOEntry(major=int(majmin[0]), minor=int(majmin[1]))
        for part in parts[1:]:
            key, sep, value = part.partition("=")
            if sep and key in _IO_KEYS and _digits(value):
                setattr(entry, key, int(value))
        entries.append(entry)
    return entries


def _hugetlb(m: pb.Metrics, path: str) -> None:
    """hugetlb.<size>.current / .max ("max" is the largest uint64)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    sizes = {n.split(".")[1] for n in names
             if n.startswith("hugetlb.") and n.count(".") == 2 and n.endswith((".current", ".max"))}
    for size in sorted(sizes, key=hugepage_order):
        stat = m.hugetlb.add(pagesize=size)
        stat.current = _single(path, f"hugetlb.{size}.current")
        stat.max = _single(path, f"hugetlb.{size}.max")


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
