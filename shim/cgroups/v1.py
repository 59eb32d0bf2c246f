"""cgroup v1 → io.containerd.cgroups.v1.Metrics, filled as github.com/containerd/cgroups (v1) fills it
with the IgnoreNotExist handler, except that a missing file skips only its own values (Go stops the
controller at the first missing file, e.g. losing kmem stats on hosts without swap accounting)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from cgroupspy.controllers import Controller
from cgroupspy.nodes import Node

from shim.api.cgroups.v1 import metrics_pb2 as pb
from shim.cgroups._parse import hugepage_order, parse_uint, read_text, read_uint
from shim.cgroups.paths import CgroupError, CgroupV1

NANOSECONDS = 1_000_000_000
# cpuacct.stat counts USER_HZ ticks (the Go library hard-codes 100, which is what sysconf says on Linux).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# memory.stat keys whose MemoryStat field is spelt differently; the rest match, with "total_" too.
_MEMORY_STAT_KEYS = {"pg_pg_in": "pgpgin", "pg_pg_out": "pgpgout", "pg_fault": "pgfault",
                     "pg_maj_fault": "pgmajfault", "hierarchical_swap_limit": "hierarchical_memsw_limit"}
_MEMORY_ENTRIES = (("usage", ""), ("swap", "memsw."), ("kernel", "kmem."), ("kernel_tcp", "kmem.tcp."))
_MEMORY_ENTRY_FILES = (("usage", "usage_in_bytes"), ("max", "max_usage_in_bytes"), ("failcnt", "failcnt"),
                       ("limit", "limit_in_bytes"))
# CFQ statistics (kernels before 5.0), then the throttle files every blkio cgroup has.
_BLKIO_CFQ = (("sectors_recursive", "sectors_recursive"),
              ("io_service_bytes_recursive", "io_service_bytes_recursive"),
              ("io_serviced_recursive", "io_serviced_recursive"), ("io_queued_recursive", "io_queued_recursive"),
              ("io_service_time_recursive", "io_service_time_recursive"),
              ("io_wait_time_recursive", "io_wait_time_recursive"), ("io_merged_recursive", "io_merged_recursive"),
              ("time_recursive", "io_time_recursive"))
_BLKIO_THROTTLE = (("throttle.io_serviced", "io_serviced_recursive"),
                   ("throttle.io_service_bytes", "io_service_bytes_recursive"))
_BLKIO_SEPARATORS = re.compile(r"[ :]")


def metrics(cg: CgroupV1) -> pb.Metrics:
    if not any(os.path.isdir(cg.dir(name)) for name in cg.paths):
        raise CgroupError(f"cgroup {dict(cg.paths)} was deleted")
    m = pb.Metrics()
    m.cpu.usage.SetInParent()  # the Go library always sends these two, even empty
    m.cpu.throttling.SetInParent()
    if "pids" in cg.paths:
        _pids(m, cg.dir("pids"))
    if "cpu" in cg.paths:
        _cpu(m, _controller(cg, "cpu"))
    if "cpuacct" in cg.paths:
        _cpuacct(m, _controller(cg, "cpuacct"))
    if "memory" in cg.paths:
        _memory(m, _controller(cg, "memory"))
    if "blkio" in cg.paths:
        _blkio(m, cg.dir("blkio"), cg.proc)
    if "hugetlb" in cg.paths:
        _hugetlb(m, cg.dir("hugetlb"))
    return m


def _controller(cg: CgroupV1, name: str) -> Controller:
    """cgroupspy's typed accessor for one controller's directory of this cgroup."""
    hierarchy = Node(os.fsencode(name), parent=Node(os.fsencode(cg.root)))
    return Node(os.fsencode(cg.paths[name].lstrip("/")), parent=hierarchy).controller


def _get(ctl: Controller, attr: str):
    """A cgroupspy property, or None when its file does not exist."""
    try:
        return getattr(ctl, attr)
    except FileNotFoundError:
        return None


def _file(ctl: Controller, name: str) -> int | None:
    try:
        return parse_uint(ctl.get_property(os.fsencode(name)))
    except FileNotFoundError:
        return None


def _u64(value: int | None) -> int:
    return 0 if value is None or value < 0 else value  # the kernel prints -1 for "unlimited" in places


def _pids(m: pb.Metrics, path: str) -> None:
    current = read_uint(os.path.join(path, "pids.current"))
    if current is None:
        return
    limit = read_text(os.path.join(path, "pids.max"))
    m.pids.current = current
    m.pids.limit = 0 if limit is None or limit.strip() == "max" else parse_uint(limit)


def _cpu(m: pb.Metrics, ctl: Controller) -> None:
    stat = _get(ctl, "stat")
    if stat is None:
        return
    m.cpu.throttling.periods = _u64(stat.get("nr_periods"))
    m.cpu.throttling.throttled_periods = _u64(stat.get("nr_throttled"))
    m.cpu.throttling.throttled_time = _u64(stat.get("throttled_time"))


def _cpuacct(m: pb.Metrics, ctl: Controller) -> None:
    usage = m.cpu.usage
    ticks = _get(ctl, "acct_stat")
    if ticks is not None:
        usage.user = _u64(ticks.get("user")) * NANOSECONDS // CLOCK_TICKS
        usage.kernel = _u64(ticks.get("system")) * NANOSECONDS // CLOCK_TICKS
    usage.total = _u64(_get(ctl, "usage"))
    usage.per_cpu.extend(_u64(v) for v in _get(ctl, "usage_percpu") or ())


def _memory(m: pb.Metrics, ctl: Controller) -> None:
    stat = _get(ctl, "stat")
    if stat is None:
        return  # as in Go: no memory.stat, no memory stats at all
    mem = m.memory
    for field in mem.DESCRIPTOR.fields:
        if field.message_type is None:
            base = field.name.removeprefix("total_")
            key = field.name[: len(field.name) - len(base)] + _MEMORY_STAT_KEYS.get(base, base)
            setattr(mem, field.name, _u64(stat.get(key)))
    oom = _get(ctl, "oom_control")
    if isinstance(oom, dict):
        m.memory_oom_control.oom_kill_disable = _u64(oom.get("oom_kill_disable"))
        m.memory_oom_control.under_oom = _u64(oom.get("under_oom"))
        m.memory_oom_control.oom_kill = _u64(oom.get("oom_kill"))
    for entry_name, module in _MEMORY_ENTRIES:
        entry = getattr(mem, entry_name)
        entry.SetInParent()
        for attr, suffix in _MEMORY_ENTRY_FILES:
            value = _file(ctl, f"memory.{module}{suffix}")
            if value is not None:
                setattr(entry, attr, value)


def _blkio(m: pb.Metrics, path: str, proc: str) -> None:
    blkio = m.blkio
    blkio.SetInParent()
    devices = _devices(read_text(os.path.join(proc, "partitions")) or "")
    found = 0
    if os.path.lexists(os.path.join(path, "blkio.io_serviced_recursive")):
        for name, field in _BLKIO_CFQ:
            found += _blkio_entries(os.path.join(path, "blkio." + name), devices, getattr(blkio, field))
    if found:
        return
    # No CFQ statistics (or the cgroup's devices use another scheduler): the throttle files.
    for name, field in _BLKIO_THROTTLE:
        _blkio_entries(os.path.join(path, "blkio." + name), devices, getattr(blkio, field))


def _blkio_entries(path: str, devices: dict[tuple[int, int], str], out) -> int:
    """Append "MAJ:MIN [Op] VALUE" lines as BlkIOEntry; return how many."""
    text = read_text(path)
    if text is None:
        return 0
    count = 0
    for line in text.splitlines():
        fields = [f for f in _BLKIO_SEPARATORS.split(line) if f]
        if not fields or (len(fields) == 2 and fields[0] == "Total"):
            continue
        if len(fields) < 3:
            raise ValueError(f"invalid line in {path}: {line!r}")
        major, minor = parse_uint(fields[0]), parse_uint(fields[1])
        op, value = (fields[2], fields[3]) if len(fields) == 4 else ("", fields[2])
        out.add(op=op, device=devices.get((major, minor), ""), major=major, minor=minor, value=parse_uint(value))
        count += 1
    return count


def _devices(partitions: str) -> dict[tuple[int, int], str]:
    """/proc/partitions: (major, minor) → /dev/<name>; its first two lines are a header and a blank."""
    devices: dict[tuple[int, int], str] = {}
    for line in partitions.splitlines()[2:]:
        fields = line.split()
        if len(fields) >= 4 and fields[0].isdigit() and fields[1].isdigit():
            devices.setdefault((int(fields[0]), int(fields[1])), "/dev/" + fields[3])
    return devices


def _hugetlb(m: pb.Metrics, path: str) -> None:
    try:
        names: Iterable[str] = os.listdir(path)
    except FileNotFoundError:
        return
    sizes = {n.split(".")[1] for n in names if n.startswith("hugetlb.") and n.endswith(".usage_in_bytes")
             and n.count(".") == 2}
    for size in sorted(sizes, key=hugepage_order):
        stat = m.hugetlb.add(pagesize=size)
        for attr, suffix in (("usage", "usage_in_bytes"), ("max", "max_usage_in_bytes"), ("failcnt", "failcnt")):
            value = read_uint(os.path.join(path, f"hugetlb.{size}.{suffix}"))
            if value is not None:
                setattr(stat, attr, value)
