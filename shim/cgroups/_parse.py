"""Reading cgroup files the way github.com/containerd/cgroups reads them (its parseUint / parseKV)."""

from __future__ import annotations

import re

U64_MAX = 2**64 - 1
_INTEGER = re.compile(r"-?[0-9]+")


def parse_uint(text: str) -> int:
    """A decimal uint64, Go-style: a negative number reads as 0 (the kernel prints -1 for some limits),
    anything else that is not a uint64 is an error."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"not an integer: {text!r}")
    value = int(text)
    if value < 0:
        return 0
    if value > U64_MAX:
        raise ValueError(f"out of uint64 range: {text!r}")
    return value


def parse_kv(text: str, *, strict: bool = True) -> dict[str, int]:
    """A flat-keyed file ("key value" per line, e.g. memory.stat, cpu.stat, memory.events). A value that
    is not a number is an error when ``strict`` (the v1 library), else left out (the v2 library)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"invalid key/value line: {line!r}")
        try:
            out[fields[0]] = parse_uint(fields[1])
        except ValueError:
            if strict:
                raise
    return out


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist (the Go library's IgnoreNotExist)."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_uint(path: str) -> int | None:
    text = read_text(path)
    return None if text is None else parse_uint(text)


_SIZE = re.compile(r"([0-9]+)([KMGTP]?)B")


def hugepage_order(size: str) -> str:
    """Sort key giving the Go library's order of hugepage sizes ("2MB", "1GB"): it lists them from the
    names of /sys/kernel/mm/hugepages/hugepages-<kB>kB, in directory-name order."""
    m = _SIZE.fullmatch(size)
    if not m:
        return size
    kib = int(m.group(1)) * 1024 ** "BKMGTP".index(m.group(2) or "B") // 1024
    return f"hugepages-{kib}kB"
