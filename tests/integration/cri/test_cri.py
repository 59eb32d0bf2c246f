"""Pods through containerd's CRI plugin, as the kubelet drives them, with handler `runc` and `pyrunc`.

Every test runs once per runtime handler with the same expectations: the stock Go shim
(io.containerd.runc.v2) is the oracle, pyrunc must behave the same under CRI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from tests.integration.cri.conftest import runc_roots
from tests.integration.test_survival import alive, shim_pid_at
from tools.stack import PYRUNC, RUNC_V2

SHIM_BINARY = {"runc": "containerd-shim-runc-v2", "pyrunc": "containerd-shim-pyrunc-v2"}
RUNTIME_TYPE = {"runc": RUNC_V2, "pyrunc": PYRUNC}
MiB = 1 << 20


def shim_pid(cri, cid: str) -> int:
    """The pid of the shim serving ``cid``, as its Task API's Connect answers on bundle/address."""
    return shim_pid_at(cri.bundle(cid), cid)


CGROUP = Path("/sys/fs/cgroup")
UNIFIED = (CGROUP / "cgroup.controllers").exists()  # a cgroup v2-only host; hybrid hosts run runc on v1


def cgroup_dir(pid: int, controller: str) -> Path:
    """Where ``pid`` sits for ``controller``: its v1 hierarchy (``/sys/fs/cgroup/cpu`` is a directory or,
    where cpu and cpuacct are mounted together, a symlink to it) or the unified v2 tree."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if (UNIFIED and hid == "0") or (not UNIFIED and controller in controllers.split(",")):
            return (CGROUP if UNIFIED else CGROUP / controller) / path.lstrip("/")
    raise AssertionError(f"no {controller} cgroup for pid {pid}")


def read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def cgroup_limits(pid: int) -> tuple[int, int, int]:
    """(memory limit, CFS quota, CPU shares) as the kernel has them; on v2 the last is cpu.weight, and
    shares() turns an expectation in shares into the weight runc sets for it."""
    if UNIFIED:
        d = cgroup_dir(pid, "")
        quota = (d / "cpu.max").read_text().split()[0]
        weight = read_int(d / "cpu.weight")
        return read_int(d / "memory.max"), -1 if quota == "max" else int(quota), weight
    memory, cpu = cgroup_dir(pid, "memory"), cgroup_dir(pid, "cpu")
    return read_int(memory / "memory.limit_in_bytes"), read_int(cpu / "cpu.cfs_quota_us"), read_int(cpu / "cpu.shares")


def shares(value: int) -> int:
    """What cgroup_limits reads back after CRI asked for ``value`` CPU shares (runc's v2 conversion)."""
    return 1 + ((value - 2) * 9999) // 262142 if UNIFIED else value


def cgroup_usage(pid: int) -> tuple[int, int]:
    """(CPU time in ns, memory usage in bytes) of ``pid``'s cgroup."""
    if UNIFIED:
        d = cgroup_dir(pid, "")
        usec = next(int(line.split()[1]) for line in (d / "cpu.stat").read_text().splitlines()
                    if line.startswith("usage_usec"))
        return usec * 1000, read_int(d / "memory.current")
    return (read_int(cgroup_dir(pid, "cpuacct") / "cpuacct.usage"),
            read_int(cgroup_dir(pid, "memory") / "memory.usage_in_bytes"))


# -- pods ------------------------------------------------------------------------------------------
def test_pod_with_two_containers_runs(cri, pods, handler):
    pb = cri.pb
    pod = pods()
    a = pod.add("a", "sh", "-c", "echo hello from a; echo to stderr >&2; exec sleep 1000")
    b = pod.add("b", "sleep", "1000")
    listed = cri.client.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod.id)))
    assert {c.metadata.name: c.state for c in listed.containers} == {"a": pb.CONTAINER_RUNNING,
                                                                     "b": pb.CONTAINER_RUNNING}
    # The handler selects the runtime type and the options from config.toml (for pyrunc CRI turns
    # `options` into runtimeoptions.v1.Options, which the shim reads its TOML file from).
    want_options = {"runc": {"root": str(runc_roots(cri.containerd)["runc"].parent)},
                    "pyrunc": {"config_path": str(cri.containerd.dir / "pyrunc.toml")}}[handler]
    for cid in (a, b):
        info = json.loads(pod.status(cid).info["info"])
        assert (info["runtimeType"], info["runtimeOptions"]) == (RUNTIME_TYPE[handler], want_options)
    # One pod: the containers share the sandbox's IPC namespace and /dev/shm.
    assert pod.exec(a, "sh", "-c", "echo shared > /dev/shm/x").exit_code == 0
    assert pod.exec(b, "cat", "/dev/shm/x").stdout == b"shared\n"
    # The containers' stdio reaches CRI's log files (the shim relays it to containerd's FIFOs).
    deadline = time.monotonic() + 5
    while "to stderr" not in pod.log_of("a") and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line.split(" ", 1)[1] for line in pod.log_of("a").splitlines()]
    assert sorted(lines) == ["stderr F to stderr", "stdout F hello from a"]


def test_one_shim_serves_the_sandbox_and_its_containers(cri, pods, handler):
    pod = pods()
    a = pod.add("a", "sleep", "1000")
    b = pod.add("b", "sleep", "1000")
    pids = {name: shim_pid(cri, cid) for name, cid in (("sandbox", pod.id), ("a", a), ("b", b))}
    assert len(set(pids.values())) == 1, f"one shim per pod (grouped by io.kubernetes.cri.sandbox-id): {pids}"
    argv = Path(f"/proc/{pids['sandbox']}/cmdline").read_bytes().split(b"\0")
    assert any(SHIM_BINARY[handler] in arg.decode() for arg in argv[:2]), argv  # argv[1] for a script
    assert argv[argv.index(b"-id") + 1].decode() == pod.id, "the shim was started for the sandbox"
    assert pids["sandbox"] in cri.containerd.shim_pids()


# -- exec ------------------------------------------------------------------------------------------
def test_exec_sync_output_and_exit_code(cri, pods, handler):
    pod = pods()
    cid = pod.add("a", "sleep", "1000")
    r = pod.exec(cid, "sh", "-c", "echo out; echo err >&2; echo out2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\nout2\n", b"err\n", 3)
    r = pod.exec(cid, "cat", "/proc/1/cmdline")
    assert (r.stdout, r.exit_code) == (b"sleep\x001000\x00", 0), "exec runs inside the container"
    r = pod.exec(cid, "seq", "1", "50000")
    assert (len(r.stdout), r.exit_code) == (len("".join(f"{i}\n" for i in range(1, 50001))), 0)


def test_exec_sync_timeout_kills_the_exec(cri, pods, handler):
    pod = pods()
    cid = pod.add("a", "sleep", "1000")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        pod.exec(cid, "sleep", "30", timeout=1)
    assert time.monotonic() - started < 10
    assert "timeout 1s exceeded" in err.value.details()
    r = pod.exec(cid, "ps", "-o", "args")
    assert b"sleep 30" not in r.stdout, "the timed-out exec was killed"
    assert pod.status(cid).status.state == cri.pb.CONTAINER_RUNNING


# -- resources -------------------------------------------------------------------------------------
def test_oom_killed_container_reports_oomkilled(cri, pods, handler):
    pod = pods()
    # busybox has no stress tool: a shell string doubling itself passes 32 MiB within a second, and the
    # kernel's OOM killer (not a failed malloc) ends the shell.
    cid = pod.add("hog", "sh", "-c", "x=a; while true; do x=$x$x; done", memory=32 * MiB)
    st = pod.wait_exited(cid)
    assert st.state == cri.pb.CONTAINER_EXITED, pod.log()
    assert (st.exit_code, st.reason) == (137, "OOMKilled"), (
        f"CRI sets OOMKilled only from the shim's /tasks/oom event\n{pod.log()}")


def test_container_stats_report_cpu_and_memory(cri, pods, handler):
    pb = cri.pb
    pod = pods()
    # Burn some CPU and hold some memory, so both numbers are clearly above zero.
    cid = pod.add("busy", "sh", "-c", "x=$(seq 1 200000); i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; "
                                      "echo ready; while true; do sleep 1; done")
    deadline = time.monotonic() + 10
    while "ready" not in pod.log_of("busy") and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = pod.pid(cid)
    try:
        stats = cri.client.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    except grpc.RpcError as e:
        raise AssertionError(f"ContainerStats failed: {e.code()} {e.details()}\n{pod.log()}") from e
    assert stats.attributes.id == cid and stats.attributes.metadata.name == "busy"
    cpu_now, mem = cgroup_usage(pid)
    assert 0 < stats.cpu.usage_core_nano_seconds.value <= cpu_now
    assert stats.cpu.timestamp > 0
    assert 0 < stats.memory.working_set_bytes.value <= stats.memory.usage_bytes.value
    assert mem // 2 <= stats.memory.usage_bytes.value <= mem * 2  # the same cgroup, a moment apart
    assert stats.memory.timestamp > 0


def test_update_container_resources_changes_the_cgroup(cri, pods, handler):
    pb = cri.pb
    pod = pods()
    cid = pod.add("a", "sleep", "1000", memory=64 * MiB, cpu_quota=50_000, cpu_shares=512)
    pid = pod.pid(cid)
    assert str(cgroup_dir(pid, "memory")).endswith(f"{pod.config.linux.cgroup_parent}/{cid}")
    assert cgroup_limits(pid) == (64 * MiB, 50_000, shares(512))
    cri.client.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(
            memory_limit_in_bytes=128 * MiB, cpu_period=100_000, cpu_quota=20_000, cpu_shares=256)))
    assert cgroup_limits(pid) == (128 * MiB, 20_000, shares(256))
    assert pod.status(cid).status.state == pb.CONTAINER_RUNNING


# -- teardown --------------------------------------------------------------------------------------
def test_stop_and_remove_leave_no_shim_mount_or_runc_state(cri, pods, handler):
    pb = cri.pb
    pod = pods()
    graceful = pod.add("graceful", "sh", "-c", "trap 'exit 7' TERM; while true; do sleep 0.1; done")
    other = pod.add("other", "sleep", "1000")
    shim = shim_pid(cri, pod.id)
    ids = [pod.id, graceful, other]
    root = runc_roots(cri.containerd)[handler]
    assert sorted(p.name for p in root.iterdir()) == sorted(ids), "runc state lives in the configured root"

    time.sleep(0.3)  # let the shell install its trap
    cri.client.StopContainer(pb.StopContainerRequest(container_id=graceful, timeout=10))
    st = pod.status(graceful).status
    assert (st.state, st.exit_code, st.reason) == (pb.CONTAINER_EXITED, 7, "Error")
    cri.client.RemoveContainer(pb.RemoveContainerRequest(container_id=graceful))
    assert not cri.bundle(graceful).exists()
    assert alive(shim), "the shim stays while the pod has containers"

    pod.stop_and_remove()
    left = cri.client.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod.id)))
    assert list(left.containers) == []
    deadline = time.monotonic() + 10
    while alive(shim) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(shim), f"shim {shim} still runs after the pod was removed\n{pod.log()}"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert not [line for line in mounts.splitlines() if any(i in line for i in ids)], "mounts left behind"
    assert not [i for i in ids if (root / i).exists()], "runc state left behind"
    assert not [i for i in ids if cri.bundle(i).exists()], "bundles left behind"
    cri_dirs = [cri.containerd.state / "io.containerd.grpc.v1.cri", cri.containerd.root / "io.containerd.grpc.v1.cri"]
    assert not [p for d in cri_dirs for p in d.rglob("*") if any(i in p.name for i in ids)], "CRI dirs left behind"
