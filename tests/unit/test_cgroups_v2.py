"""cgroup v2 metrics from fixture trees in the kernel's file formats (Documentation/admin-guide/cgroup-v2.rst)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.api.cgroups.v2 import metrics_pb2 as pb
from shim.cgroups import CgroupError, CgroupV2, Mode, find, metrics, stats

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups" / "v2"
ROOT, PROC = str(FIXTURES / "sys/fs/cgroup"), str(FIXTURES / "proc")
U64 = 2**64 - 1


def fixture(pid: int) -> pb.Metrics:
    cg = find(pid, root=ROOT, proc=PROC, cgroup_mode=Mode.UNIFIED)
    m = metrics(cg)
    assert isinstance(m, pb.Metrics)
    return m


def test_stats_is_an_any_with_the_bare_full_name() -> None:
    cg = find(5151, root=ROOT, proc=PROC, cgroup_mode=Mode.UNIFIED)
    any_ = stats(cg)
    assert any_.type_url == "io.containerd.cgroups.v2.Metrics"
    assert pb.Metrics.FromString(any_.value) == metrics(cg)


def test_pids_and_cpu() -> None:
    m = fixture(5151)
    assert m.pids == pb.PidsStat(current=9, limit=U64)  # v2 reports "max" as the largest uint64
    assert m.cpu == pb.CPUStat(usage_usec=3021817, user_usec=2004545, system_usec=1017272, nr_periods=151,
                               nr_throttled=12, throttled_usec=401835)


def test_memory_stat_current_max_and_swap() -> None:
    mem = fixture(5151).memory
    assert [f.name for f in mem.DESCRIPTOR.fields if not getattr(mem, f.name)] == []  # every field found
    assert (mem.anon, mem.file, mem.kernel_stack, mem.slab, mem.sock, mem.shmem) == (
        20115456, 5931008, 163840, 612152, 8192, 16384)
    assert (mem.file_mapped, mem.file_dirty, mem.file_writeback, mem.anon_thp) == (3170304, 20480, 24576, 2097152)
    assert (mem.inactive_anon, mem.active_anon, mem.inactive_file, mem.active_file, mem.unevictable) == (
        20099072, 32768, 4083712, 1847296, 36864)
    assert (mem.slab_reclaimable, mem.slab_unreclaimable, mem.pgfault, mem.pgmajfault) == (280704, 331448, 13245, 52)
    assert (mem.workingset_refault, mem.workingset_activate, mem.workingset_nodereclaim) == (44, 46, 47)
    assert (mem.pgrefill, mem.pgscan, mem.pgsteal, mem.pgactivate, mem.pgdeactivate) == (205, 1211, 1187, 712, 203)
    assert (mem.pglazyfree, mem.pglazyfreed, mem.thp_fault_alloc, mem.thp_collapse_alloc) == (3, 2, 1, 4)
    assert (mem.usage, mem.usage_limit, mem.swap_usage, mem.swap_limit) == (27389952, 268435456, 4096, U64)


def test_memory_events() -> None:
    assert fixture(5151).memory_events == pb.MemoryEvents(low=0, high=0, max=41, oom=3, oom_kill=2)


def test_io_stat_lines() -> None:
    assert list(fixture(5151).io.usage) == [
        pb.IOEntry(major=8, minor=0, rbytes=1459200, wbytes=314773504, rios=192, wios=353),
        pb.IOEntry(major=253, minor=0, rbytes=1454080, wbytes=314769408, rios=191, wios=352)]


def test_hugetlb_current_and_max_without_the_reservation_files() -> None:
    assert list(fixture(5151).hugetlb) == [pb.HugeTlbStat(pagesize="1GB", current=0, max=2147483648),
                                           pb.HugeTlbStat(pagesize="2MB", current=2097152, max=U64)]


def test_rdma_is_sent_empty_like_go_sends_it_on_hosts_without_rdma() -> None:
    m = fixture(5151)
    assert m.HasField("rdma") and m.rdma == pb.RdmaStat()


def test_a_cgroup_without_controllers_has_cpu_usage_and_nothing_else() -> None:
    m = fixture(5252)
    assert m.cpu == pb.CPUStat(usage_usec=1500, user_usec=1000, system_usec=500)
    assert m.pids == pb.PidsStat() and m.memory == pb.MemoryStat()
    assert not m.HasField("memory_events")  # no memory.events: left unset, as Go does
    assert m.HasField("io") and not m.io.usage and not m.hugetlb


def test_odd_lines_are_skipped_as_go_skips_them(tmp_path: Path) -> None:
    (tmp_path / "io.stat").write_text("8:0 rbytes=1 wbytes=x rios=3 bogus\nnonsense\n8:16 rbytes=5\nx:y rbytes=1\n"
                                      "9:0 rbytes=7\n")
    (tmp_path / "memory.stat").write_text("anon 5\nfile notanumber\n")
    (tmp_path / "pids.max").write_text("-1\n")
    m = metrics(CgroupV2(str(tmp_path)))
    # a bad device number ends the list, as in Go
    assert list(m.io.usage) == [pb.IOEntry(major=8, minor=0, rbytes=1, rios=3), pb.IOEntry(major=8, minor=16, rbytes=5)]
    assert (m.memory.anon, m.memory.file) == (5, 0)
    assert m.pids.limit == 0


def test_a_deleted_cgroup_is_a_cgroup_error(tmp_path: Path) -> None:
    with pytest.raises(CgroupError):
        metrics(CgroupV2(str(tmp_path / "gone")))
