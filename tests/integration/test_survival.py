"""Survival: a shim killed under containerd, containerd restarted under running tasks, grouping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.ttrpc import Client
from tests.integration.test_shim import RUNTIMES, Events, same, wait_status
from tools.stack import PYRUNC, PrivateContainerd, build_oci_image_tar

IMAGE = "localhost/pyrunc-test/busybox:latest"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def shim_of(stack, cid: str) -> int:
    """The pid of the shim serving ``cid``, as its Task API's Connect tells."""
    return shim_pid_at(bundle(stack, cid), cid)


def shim_pid_at(bundle_dir: Path, cid: str) -> int:
    sock = (bundle_dir / "address").read_text().strip().removeprefix("unix://")

    async def connect() -> int:
        async with await Client.connect(sock) as client:
            reply = await client.call("containerd.task.v2.Task", "Connect", api.ConnectRequest(id=cid),
                                      api.ConnectResponse, timeout=10)
            return reply.shim_pid

    return asyncio.run(connect())


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def bundle(stack, cid: str) -> Path:
    return stack.state / "io.containerd.runtime.v2.task" / stack.namespace / cid


def exits_of(events, cid: str) -> list[int]:
    return [body.get("exit_status", 0) for topic, body in events if topic == "/tasks/exit"
            and body.get("container_id") == cid]


def test_killed_shim_is_cleaned_up_and_id_reusable(containerd, busybox_image):
    def scenario(runtime, tag):
        cid = uid(tag)
        containerd.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "1000")
        init_pid = int(containerd.ctr("task", "ls").stdout.split(cid, 1)[1].split()[0])
        os.kill(shim_of(containerd, cid), signal.SIGKILL)
        # containerd notices the closed connection, runs the shim's `delete` and drops the task
        deadline = time.monotonic() + 10
        while cid in containerd.ctr("task", "ls", "-q").stdout.split() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = "gone" if cid not in containerd.ctr("task", "ls", "-q").stdout.split() else "present"
        time.sleep(0.2)
        init_alive = Path(f"/proc/{init_pid}").exists() and "Z" not in Path(f"/proc/{init_pid}/stat").read_text()
        rootfs_mounted = str(bundle(containerd, cid) / "rootfs") in Path("/proc/self/mountinfo").read_text()
        containerd.ctr("task", "delete", cid, check=False)
        containerd.ctr("container", "delete", cid)
        again = containerd.ctr("run", "--rm", "--runtime", runtime, busybox_image, cid, "echo", "reused")
        return status, init_alive, rootfs_mounted, again.stdout

    assert same({tag: scenario(rt, tag) for tag, rt in RUNTIMES.items()}) == ("gone", False, False, "reused\n")


def test_killed_shim_reports_the_real_exit_status(containerd, busybox_image):
    """Beyond the Go shim: containerd's cleanup after a dead shim republishes the exit; the Go shim's
    `delete` can only say 137, ours reads the status the shim had recorded in the bundle."""
    results = {}
    for tag, runtime in RUNTIMES.items():
        cid = uid(tag)
        events = Events(containerd)
        containerd.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sh", "-c", "exit 3")
        assert wait_status(containerd, cid, "STOPPED") == "STOPPED"
        time.sleep(0.2)
        os.kill(shim_of(containerd, cid), signal.SIGKILL)
        time.sleep(1.0)
        containerd.ctr("task", "delete", cid, check=False)
        containerd.ctr("container", "delete", cid, check=False)
        results[tag] = exits_of(events.stop(), cid)
    assert results["py"] == [3, 3]
    assert results["go"][0] == 3 and results["go"][1:] in ([], [137])


def test_group_annotation_shares_one_shim(containerd, busybox_image):
    group = uid("group")
    cids = [uid("g") for _ in range(3)]
    for cid in cids:
        containerd.ctr("run", "-d", "--runtime", PYRUNC, "--annotation", f"io.containerd.runc.v2.group={group}",
                       busybox_image, cid, "sh", "-c", "sleep 1000")
    shims = {shim_of(containerd, cid) for cid in cids}
    assert len(shims) == 1, "one shim serves the group"
    (shim,) = shims
    addresses = {(bundle(containerd, cid) / "address").read_text() for cid in cids}
    assert len(addresses) == 1
    # each container's lifecycle is its own
    r = containerd.ctr("task", "exec", "--exec-id", "e", cids[1], "sh", "-c", "echo in-1; exit 6", check=False)
    assert (r.returncode, r.stdout) == (6, "in-1\n")
    containerd.ctr("task", "kill", "-s", "KILL", cids[0])
    assert wait_status(containerd, cids[0], "STOPPED") == "STOPPED"
    assert wait_status(containerd, cids[1], "RUNNING") == "RUNNING"
    containerd.ctr("task", "delete", cids[0])
    containerd.ctr("container", "delete", cids[0])
    assert Path(f"/proc/{shim}").exists(), "the shim stays while it has containers"
    for cid in cids[1:]:
        containerd.ctr("task", "kill", "-s", "KILL", cid)
        assert wait_status(containerd, cid, "STOPPED") == "STOPPED"
        containerd.ctr("task", "delete", cid)
        containerd.ctr("container", "delete", cid)
    deadline = time.monotonic() + 5
    while alive(shim) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(shim), "the shim exits once its last container is deleted"


@pytest.fixture
def own_containerd(stack_available, busybox_rootfs, tmp_path):
    stack = PrivateContainerd(namespace="restart").start()
    try:
        stack.ctr("image", "import", str(build_oci_image_tar(busybox_rootfs, tmp_path / "bb.tar", IMAGE)))
        yield stack
    finally:
        if stack.proc is not None and stack.proc.poll() is not None:
            stack.start()  # so stop() can clean up through containerd
        stack.stop()


def test_containerd_restart_keeps_tasks_and_delivers_exits_raised_meanwhile(own_containerd):
    stack = own_containerd
    keeper, quitter = uid("keep"), uid("quit")
    stack.ctr("run", "-d", "--runtime", PYRUNC, IMAGE, keeper, "sleep", "1000")
    stack.ctr("run", "-d", "--runtime", PYRUNC, IMAGE, quitter, "sh", "-c", "sleep 2; exit 9")
    shims = {shim_of(stack, keeper), shim_of(stack, quitter)}
    stack.stop_daemon()
    time.sleep(3)  # the quitter exits while containerd is away: the exit waits in the shim's outbox
    log_before = len(stack.log())
    stack.start()
    assert wait_status(stack, quitter, "STOPPED") == "STOPPED"
    assert wait_status(stack, keeper, "RUNNING") == "RUNNING"
    assert {shim_of(stack, keeper), shim_of(stack, quitter)} == shims, "the same shims serve after the restart"
    r = stack.ctr("task", "exec", "--exec-id", "after", keeper, "echo", "still here")
    assert r.stdout == "still here\n"
    deadline = time.monotonic() + 10
    while "topic=/tasks/exit" not in stack.log()[log_before:] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "msg=\"event forwarded\" ns=restart topic=/tasks/exit" in stack.log()[log_before:], \
        "the exit raised while containerd was away is forwarded once it is back"
    delete = stack.ctr("task", "delete", quitter)
    assert "exit code 9" in delete.stderr


def test_socket_directory_is_root_only(containerd, busybox_image):
    cid = uid("sock")
    containerd.ctr("run", "-d", "--runtime", PYRUNC, busybox_image, cid, "sleep", "1000")
    try:
        address = (bundle(containerd, cid) / "address").read_text().strip()
        assert address.startswith("unix:///run/containerd/s/") and "@" not in address
        path = address.removeprefix("unix://")
        assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
        assert os.stat(path).st_mode & 0o077 == 0
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", cid)
        wait_status(containerd, cid, "STOPPED")
        containerd.ctr("task", "delete", cid, check=False)
        containerd.ctr("container", "delete", cid, check=False)
        subprocess.run(["true"])
