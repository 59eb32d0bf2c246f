"""cgroup v1 metrics: fixture trees in real kernel formats, and real cgroups of processes on this host."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.api.cgroups.v1 import metrics_pb2 as pb
from shim.cgroups import CgroupError, CgroupV1, Mode, find, metrics, mode, stats
from shim.cgroups.v1 import CLOCK_TICKS

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups" / "v1"
ROOT, PROC = str(FIXTURES / "sys/fs/cgroup"), str(FIXTURES / "proc")


def fixture(pid: int) -> pb.Metrics:
    cg = find(pid, root=ROOT, proc=PROC, cgroup_mode=Mode.HYBRID)
    assert isinstance(cg, CgroupV1)
    m = metrics(cg)
    assert isinstance(m, pb.Metrics)
    return m


def entries(items) -> list[tuple[str, int, int, str, int]]:
    return [(e.device, e.major, e.minor, e.op, e.value) for e in items]


def test_stats_is_an_any_with_the_bare_full_name() -> None:
    cg = find(4242, root=ROOT, proc=PROC, cgroup_mode=Mode.HYBRID)
    any_ = stats(cg)
    assert any_.type_url == "io.containerd.cgroups.v1.Metrics"
    assert pb.Metrics.FromString(any_.value) == metrics(cg)


def test_memory_stat_fields_map_as_the_go_library_maps_them() -> None:
    mem = fixture(4242).memory
    # every plain field was found (the fixture has all of them, all non-zero)
    assert [f.name for f in mem.DESCRIPTOR.fields if f.message_type is None and not getattr(mem, f.name)] == []
    assert (mem.cache, mem.rss, mem.rss_huge, mem.mapped_file, mem.dirty, mem.writeback) == (
        10813440, 2985984, 2097152, 5406720, 135168, 8192)
    assert (mem.pg_pg_in, mem.pg_pg_out, mem.pg_fault, mem.pg_maj_fault) == (6216, 3020, 8754, 66)
    assert (mem.inactive_anon, mem.active_anon, mem.inactive_file, mem.active_file, mem.unevictable) == (
        16384, 3031040, 5365760, 5402624, 20480)
    assert (mem.hierarchical_memory_limit, mem.hierarchical_swap_limit) == (268435456, 536870912)
    assert (mem.total_cache, mem.total_rss, mem.total_rss_huge, mem.total_mapped_file, mem.total_dirty,
            mem.total_writeback) == (10854400, 3002368, 4194304, 5410816, 139264, 24576)
    assert (mem.total_pg_pg_in, mem.total_pg_pg_out, mem.total_pg_fault, mem.total_pg_maj_fault) == (
        6300, 3100, 8800, 70)
    assert (mem.total_inactive_anon, mem.total_active_anon, mem.total_inactive_file, mem.total_active_file,
            mem.total_unevictable) == (28672, 3035136, 5369856, 5406720, 32768)


def test_memory_usage_entries_and_oom_control() -> None:
    m = fixture(4242)
    entry = pb.MemoryEntry
    assert m.memory.usage == entry(usage=14680064, max=33554432, failcnt=17, limit=268435456)
    assert m.memory.swap == entry(usage=14745600, max=33619968, failcnt=3, limit=536870912)
    assert m.memory.kernel == entry(usage=1044480, max=1310720, failcnt=5, limit=9223372036854771712)
    assert m.memory.kernel_tcp == entry(usage=4096, max=8192, failcnt=0, limit=9223372036854771712)
    assert m.memory_oom_control == pb.MemoryOomControl(oom_kill_disable=0, under_oom=0, oom_kill=2)


def test_memory_without_swap_accounting_keeps_the_kernel_entries() -> None:
    # no memory.memsw.* files: swap stays empty, but kmem is still read (Go stops at the first missing file)
    m = fixture(4343)
    assert m.memory.HasField("swap") and m.memory.swap == pb.MemoryEntry()
    assert m.memory.kernel == pb.MemoryEntry(usage=659456, max=1011712, limit=9223372036854771712)
    assert m.memory.usage == pb.MemoryEntry(usage=2281472, max=4640768, limit=9223372036854771712)
    assert m.memory.hierarchical_swap_limit == 0 and m.memory.hierarchical_memory_limit == 9223372036854771712
    assert m.memory_oom_control == pb.MemoryOomControl(oom_kill_disable=1, under_oom=1)


def test_cpu_usage_converts_ticks_to_nanoseconds_and_reads_throttling() -> None:
    cpu = fixture(4242).cpu
    assert cpu.usage.total == 6220104939
    assert cpu.usage.user == 412 * 1_000_000_000 // CLOCK_TICKS
    assert cpu.usage.kernel == 181 * 1_000_000_000 // CLOCK_TICKS
    assert list(cpu.usage.per_cpu) == [3155040398, 3065064541]
    assert cpu.throttling == pb.Throttle(periods=3010, throttled_periods=47, throttled_time=2378119850)
    assert list(fixture(4343).cpu.usage.per_cpu) == [20166395, 31020582, 0, 50531059]


def test_pids_max_means_no_limit_which_v1_reports_as_zero() -> None:
    assert fixture(4242).pids == pb.PidsStat(current=7, limit=0)
    assert fixture(4343).pids == pb.PidsStat(current=1, limit=4096)


def test_blkio_reads_the_cfq_recursive_files_with_device_names() -> None:
    blkio = fixture(4242).blkio
    assert entries(blkio.io_service_bytes_recursive) == [
        ("/dev/sda", 8, 0, "Read", 18911232), ("/dev/sda", 8, 0, "Write", 4096),
        ("/dev/sda", 8, 0, "Sync", 18915328), ("/dev/sda", 8, 0, "Async", 0), ("/dev/sda", 8, 0, "Total", 18915328),
        ("/dev/dm-0", 253, 0, "Read", 18907136), ("/dev/dm-0", 253, 0, "Write", 4096),
        ("/dev/dm-0", 253, 0, "Sync", 18911232), ("/dev/dm-0", 253, 0, "Async", 0),
        ("/dev/dm-0", 253, 0, "Total", 18911232)]
    assert entries(blkio.io_serviced_recursive)[0] == ("/dev/sda", 8, 0, "Read", 2310)
    assert len(blkio.io_serviced_recursive) == 10
    assert [e.value for e in blkio.io_queued_recursive] == [0] * 5
    assert entries(blkio.io_service_time_recursive)[1] == ("/dev/sda", 8, 0, "Write", 286102)
    assert entries(blkio.io_wait_time_recursive)[0] == ("/dev/sda", 8, 0, "Read", 2096135364)
    assert entries(blkio.io_merged_recursive)[0] == ("/dev/sda", 8, 0, "Read", 4)
    # three-field lines carry no op
    assert entries(blkio.io_time_recursive) == [("/dev/sda", 8, 0, "", 5324)]
    assert entries(blkio.sectors_recursive) == [("/dev/sda", 8, 0, "", 36944), ("/dev/dm-0", 253, 0, "", 36936)]


def test_blkio_falls_back_to_the_throttle_files_without_cfq() -> None:
    blkio = fixture(4343).blkio
    assert entries(blkio.io_service_bytes_recursive) == [
        ("/dev/sda", 8, 0, "Read", 1327104), ("/dev/sda", 8, 0, "Write", 8192), ("/dev/sda", 8, 0, "Sync", 1335296),
        ("/dev/sda", 8, 0, "Async", 0), ("/dev/sda", 8, 0, "Discard", 0), ("/dev/sda", 8, 0, "Total", 1335296)]
    assert [e.value for e in blkio.io_serviced_recursive] == [81, 2, 83, 0, 0, 83]
    assert not blkio.io_queued_recursive and not blkio.sectors_recursive


def test_hugetlb_per_page_size_in_the_go_librarys_order() -> None:
    assert list(fixture(4242).hugetlb) == [
        pb.HugetlbStat(pagesize="1GB", usage=1073741824, max=1073741824, failcnt=0),
        pb.HugetlbStat(pagesize="2MB", usage=4194304, max=6291456, failcnt=1)]
    assert list(fixture(4343).hugetlb) == []  # the hierarchy root of this fixture has no hugetlb files


def test_missing_controllers_and_files_are_left_out(tmp_path: Path) -> None:
    (tmp_path / "memory" / "c").mkdir(parents=True)
    (tmp_path / "pids" / "c").mkdir(parents=True)
    (tmp_path / "memory" / "c" / "memory.usage_in_bytes").write_text("4096\n")
    m = metrics(CgroupV1(str(tmp_path), {"memory": "/c", "pids": "/c"}, proc=str(tmp_path)))
    # no memory.stat: no memory at all, as in Go; no pids.current: no pids; cpu is always there
    assert not m.HasField("memory") and not m.HasField("pids") and not m.HasField("blkio")
    assert m.HasField("cpu") and m.cpu == pb.CPUStat(usage=pb.CPUUsage(), throttling=pb.Throttle())


def test_negative_values_read_as_zero_and_garbage_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "memory" / "c"
    d.mkdir(parents=True)
    (d / "memory.stat").write_text("cache 1\nrss -4096\n")
    (d / "memory.limit_in_bytes").write_text("-1\n")
    cg = CgroupV1(str(tmp_path), {"memory": "/c"})
    m = metrics(cg)
    assert (m.memory.cache, m.memory.rss, m.memory.usage.limit) == (1, 0, 0)
    (d / "memory.stat").write_text("cache one\n")
    with pytest.raises(ValueError):
        metrics(cg)


def test_a_deleted_cgroup_is_a_cgroup_error(tmp_path: Path) -> None:
    with pytest.raises(CgroupError):
        metrics(CgroupV1(str(tmp_path), {"memory": "/gone", "cpu": "/gone"}))


# -- this host ----------------------------------------------------------------------------------------

def v1_host() -> None:
    if mode() not in (Mode.LEGACY, Mode.HYBRID):
        pytest.skip(f"this host's cgroups are {mode().value}, not v1")


@contextlib.contextmanager
def sleeping_child() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_real_cgroup_of_a_child_in_our_own_cgroup() -> None:
    v1_host()
    with sleeping_child() as child:
        cg = find(child.pid)
        assert isinstance(cg, CgroupV1)
        m = metrics(cg)
        assert stats(cg).type_url == "io.containerd.cgroups.v1.Metrics"
    if "memory" in cg.paths:
        assert m.memory.usage.usage > 0 and m.memory.usage.limit > 0
        assert m.memory.total_rss + m.memory.total_cache > 0
    if "cpuacct" in cg.paths:
        assert m.cpu.usage.total > 0 and m.cpu.usage.per_cpu and m.cpu.usage.user + m.cpu.usage.kernel > 0
        assert len(m.cpu.usage.per_cpu) >= os.cpu_count()  # possible CPUs, at least the online ones
    if "pids" in cg.paths and os.path.exists(os.path.join(cg.dir("pids"), "pids.current")):
        assert m.pids.current >= 1  # (a hierarchy root has no pids.current: then pids is left out)
    else:
        assert not m.HasField("pids")


CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "blkio")


@pytest.fixture
def fresh_cgroups() -> Iterator[dict[str, str]]:
    """A new cgroup in each v1 hierarchy this host mounts: {controller: directory}."""
    v1_host()
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    name = f"pyrunc-test-{secrets.token_hex(4)}"
    made: dict[str, str] = {}
    try:
        for ctl in CONTROLLERS:
            base = os.path.join("/sys/fs/cgroup", ctl)
            if os.path.isfile(os.path.join(base, "cgroup.procs")):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(base, name))
                made[ctl] = os.path.join(base, name)
        if "memory" not in made or "pids" not in made:
            pytest.skip("this host mounts no v1 memory or pids hierarchy")
        yield made
    finally:
        for path in made.values():
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)  # the killed child is still leaving the cgroup


def test_real_fresh_cgroups_report_what_was_set(fresh_cgroups: dict[str, str]) -> None:
    with open(os.path.join(fresh_cgroups["memory"], "memory.limit_in_bytes"), "w") as f:
        f.write(str(256 << 20))
    with open(os.path.join(fresh_cgroups["pids"], "pids.max"), "w") as f:
        f.write("100")
    with sleeping_child() as child:
        for path in fresh_cgroups.values():
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(child.pid))
        # let it fault in a little memory in its new cgroup
        time.sleep(0.05)
        cg = find(child.pid)
        assert isinstance(cg, CgroupV1)
        name = "/" + os.path.basename(fresh_cgroups["memory"])
        assert {c: cg.paths[c] for c in fresh_cgroups} == {c: name for c in fresh_cgroups}
        m = metrics(cg)
    assert m.pids == pb.PidsStat(current=1, limit=100)
    assert m.memory.usage.limit == 256 << 20
    assert m.memory.hierarchical_memory_limit == 256 << 20
    assert m.memory_oom_control.under_oom == 0 and m.memory_oom_control.oom_kill == 0
    if "cpuacct" in fresh_cgroups:
        assert len(m.cpu.usage.per_cpu) >= os.cpu_count()
    if "blkio" in fresh_cgroups:
        assert m.HasField("blkio")
