"""Finding a process's cgroup: /proc/<pid>/cgroup, mount roots, v1 vs v2 (fixture trees and this host)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shim.cgroups import CgroupError, CgroupV1, CgroupV2, Mode, find, mode
from shim.cgroups.paths import parse_proc_cgroup, v1_mount_roots

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups"
V1_ROOT, V1_PROC = str(FIXTURES / "v1/sys/fs/cgroup"), str(FIXTURES / "v1/proc")
V2_ROOT, V2_PROC = str(FIXTURES / "v2/sys/fs/cgroup"), str(FIXTURES / "v2/proc")


def test_parse_proc_cgroup_splits_comounted_controllers_and_keeps_the_unified_path() -> None:
    controllers, unified = parse_proc_cgroup("3:cpu,cpuacct:/a\n1:name=systemd:/a/b\n0::/a/b/c\n")
    assert controllers == {"cpu": "/a", "cpuacct": "/a", "name=systemd": "/a/b"}
    assert unified == "/a/b/c"
    assert parse_proc_cgroup("0::/\n") == ({}, "/")
    with pytest.raises(CgroupError):
        parse_proc_cgroup("garbage\n")


def test_v1_mount_roots_read_the_super_options_and_unescape_paths() -> None:
    mountinfo = ("31 25 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
                 "38 25 0:36 /with\\040space /sys/fs/cgroup/memory rw shared:20 - cgroup cgroup rw,memory\n"
                 "26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
                 "25 22 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n")
    assert v1_mount_roots(mountinfo) == {"rw": "/docker/abc", "cpu": "/docker/abc", "cpuacct": "/docker/abc",
                                         "memory": "/with space"}


def test_find_v1_lists_the_controllers_with_metrics_whose_directories_exist() -> None:
    cg = find(4242, root=V1_ROOT, proc=V1_PROC, cgroup_mode=Mode.HYBRID)
    assert isinstance(cg, CgroupV1)
    assert dict(cg.paths) == {c: "/default/ctr1" for c in ("pids", "cpu", "cpuacct", "memory", "blkio", "hugetlb")}
    assert cg.dir("memory") == os.path.join(V1_ROOT, "memory/default/ctr1")
    assert os.path.isfile(os.path.join(cg.dir("cpuacct"), "cpuacct.usage"))  # through the cpuacct symlink
    # ctr2 sits at the hugetlb root ("/"): that directory exists, so hugetlb is listed too
    cg2 = find(4343, root=V1_ROOT, proc=V1_PROC, cgroup_mode=Mode.LEGACY)
    assert isinstance(cg2, CgroupV1) and cg2.paths["hugetlb"] == "/" and cg2.paths["memory"] == "/default/ctr2"


def test_find_v1_makes_paths_relative_to_the_mounted_hierarchy_root(tmp_path: Path) -> None:
    # A container without a cgroup namespace: /proc shows host paths, the mounts show the subtree.
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    (root / "memory" / "inner").mkdir(parents=True)
    (proc / "7").mkdir(parents=True)
    (proc / "self").mkdir()
    (proc / "7" / "cgroup").write_text("4:memory:/docker/abc/inner\n0::/\n")
    (proc / "self" / "mountinfo").write_text(
        "38 25 0:36 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n")
    cg = find(7, root=str(root), proc=str(proc), cgroup_mode=Mode.LEGACY)
    assert isinstance(cg, CgroupV1) and dict(cg.paths) == {"memory": "/inner"}
    # the process in the mounted root itself is at "/" (the Go library would look for /docker/abc)
    (proc / "7" / "cgroup").write_text("4:memory:/docker/abc\n")
    assert dict(find(7, root=str(root), proc=str(proc), cgroup_mode=Mode.LEGACY).paths) == {"memory": "/"}


def test_find_v2_is_the_unified_path_under_root() -> None:
    assert find(5151, root=V2_ROOT, proc=V2_PROC, cgroup_mode=Mode.UNIFIED) == CgroupV2(
        os.path.join(V2_ROOT, "default/ctr1"))


@pytest.mark.parametrize("pid, root, proc, cgroup_mode", [
    (4444, V1_ROOT, V1_PROC, Mode.HYBRID),     # every directory is gone
    (5353, V2_ROOT, V2_PROC, Mode.UNIFIED),    # the directory is gone
    (9999, V1_ROOT, V1_PROC, Mode.LEGACY),     # no such process
    (4242, V1_ROOT, V1_PROC, Mode.UNAVAILABLE),
])
def test_find_raises_cgroup_error_when_there_is_nothing_to_read(pid: int, root: str, proc: str,
                                                                 cgroup_mode: Mode) -> None:
    with pytest.raises(CgroupError):
        find(pid, root=root, proc=proc, cgroup_mode=cgroup_mode)


def test_mode_of_this_host_and_of_a_plain_directory(tmp_path: Path) -> None:
    assert mode(str(tmp_path)) is Mode.LEGACY  # no cgroup2 filesystem anywhere: legacy (v1 metrics)
    assert mode(str(tmp_path / "missing")) is Mode.UNAVAILABLE
    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("no /sys/fs/cgroup")
    host = mode()
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4]: line.split(" - ")[1].split()[0] for line in f}
    if mounts.get("/sys/fs/cgroup") == "cgroup2":
        assert host is Mode.UNIFIED
    elif mounts.get("/sys/fs/cgroup/unified") == "cgroup2":
        assert host is Mode.HYBRID
    else:
        assert host is Mode.LEGACY


def test_find_on_this_host_for_a_child_process() -> None:
    if mode() is Mode.UNAVAILABLE:
        pytest.skip("no cgroup filesystem on this host")
    child = subprocess.Popen(["sleep", "30"])
    try:
        cg = find(child.pid)
        # the child inherited our cgroup
        assert cg == find(os.getpid())
        if isinstance(cg, CgroupV1):
            assert cg.paths and all(os.path.isdir(cg.dir(c)) for c in cg.paths)
        else:
            assert os.path.isdir(cg.path)
    finally:
        child.kill()
        child.wait()
    with pytest.raises(CgroupError):
        find(child.pid)


def test_join_moves_us_into_each_hierarchy_that_has_the_cgroup(tmp_path):
    from shim import cgroups

    for hierarchy in ("memory", "pids"):
        (tmp_path / hierarchy / "shims").mkdir(parents=True)
        (tmp_path / hierarchy / "shims" / "cgroup.procs").write_text("")
    (tmp_path / "cpu").mkdir()  # no such cgroup there: nothing is created
    assert cgroups.join("/shims", str(tmp_path)) == [str(tmp_path / "memory" / "shims"),
                                                      str(tmp_path / "pids" / "shims")]
    assert (tmp_path / "memory" / "shims" / "cgroup.procs").read_text() == str(os.getpid())
    assert not (tmp_path / "cpu" / "shims").exists()
    assert cgroups.join("/absent", str(tmp_path)) == []
