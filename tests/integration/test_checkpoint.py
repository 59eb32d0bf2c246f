"""Checkpoint and restore under real containerd, runc and criu, differential against the Go shim.

containerd 1.6 lets ``ctr task checkpoint`` drive any runtime: for one not named io.containerd.runc.*
it sends no options (``--exit``/``--image-path`` are dropped) and a temp dir as the image path, pausing
the task around the call. ``ctr run --checkpoint IMAGE`` restores through any runtime the same way.

A real dump needs a criu that works on this kernel: the round trip probes criu first and is skipped,
with criu's own reason, where it cannot dump (e.g. "vdso: Unexpected rt vDSO area bounds" on some VMs).
What runs everywhere: the failure of ``ctr task checkpoint`` compared with the Go shim's, the options
reaching runc and criu through our ttrpc client, and a Create from a checkpoint restored at Start by
the real runc.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim.api.containerd.runc.v1 import options_pb2
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.ttrpc import Client, Code, TTRPCError
from tests.integration.test_shim import RUNTIMES, Events, both, cleanup, same, task_events, uid, wait_status
from tools.stack import PYRUNC

TASK = "containerd.task.v2.Task"


@functools.cache
def criu_cannot_dump() -> str | None:
    """None when criu can dump a plain process here; else criu's reason, as it said it."""
    criu = shutil.which("criu")
    if criu is None:
        return "criu is not installed (apt-get install criu)"
    with tempfile.TemporaryDirectory(prefix="criu-probe-") as images:
        sleeper = subprocess.Popen(["sleep", "100"], start_new_session=True, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            r = subprocess.run([criu, "dump", "-t", str(sleeper.pid), "-D", images, "-o", "dump.log", "--shell-job"],
                               capture_output=True, text=True, timeout=60)
        finally:
            sleeper.kill()
            sleeper.wait()
        if r.returncode == 0:
            return None
        log = Path(images, "dump.log")
        text = log.read_text(errors="replace") if log.exists() else r.stderr
        errors = [line.split(") ", 1)[-1] for line in text.splitlines() if "Error (" in line]
        return f"`criu dump` of a sleeping process exited {r.returncode}: " + ("; ".join(errors[-3:]) or text[-300:])


def bundle_of(stack, cid: str) -> Path:
    return stack.state / "io.containerd.runtime.v2.task" / stack.namespace / cid


def criu_errors(path: Path) -> list[str]:
    """criu's error lines, timestamps dropped."""
    return [re.sub(r"^\(\s*[\d.]+\)\s*", "", line) for line in path.read_text(errors="replace").splitlines()
            if "Error (" in line]


@pytest.fixture
def stack(containerd, busybox_image):
    return containerd


# -- what runs on any machine -------------------------------------------------------------------

def test_ctr_task_checkpoint_ends_as_with_the_go_shim(stack, busybox_image):
    """Where criu cannot dump both fail alike, naming criu's log kept in the bundle; where it can,
    both succeed and the task keeps running. pyrunc also publishes /tasks/checkpointed (Go's v2
    shim does not)."""
    def scenario(runtime, tag):
        cid = uid(f"ckfail-{tag}")
        stack.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "1000")
        events = Events(stack)
        try:
            r = stack.ctr("task", "checkpoint", cid, check=False)
            bundle = bundle_of(stack, cid)
            # each shim's own wording before runc's reason: Go's go-runc error, our "OCI runtime …"
            message = re.sub(r"^ctr: (runc did not terminate successfully: exit status \d+|"
                             r"OCI runtime checkpoint failed): ", "", r.stderr.strip().replace(str(bundle), "<bundle>"))
            dump_log = bundle / "criu-dump.log"
            errors = criu_errors(dump_log) if dump_log.exists() else None
            left = [str(p) for p in (bundle / "criu-work", bundle / "work" / "criu-work") if p.exists()]
            status = wait_status(stack, cid, "RUNNING")
            image = r.stdout.strip()
            if image:
                stack.ctr("image", "rm", image, check=False)
        finally:
            seq = task_events(events.stop(), cid)
            cleanup(stack, cid)
        checkpointed = ("/tasks/checkpointed",) in seq
        assert checkpointed == (tag == "py" and r.returncode == 0), seq
        seq = [e for e in seq if e != ("/tasks/checkpointed",)]
        return r.returncode, message, errors, left, status, seq

    returncode, message, errors, left, status, seq = same(both(scenario))
    assert (left, status) == ([], "RUNNING")
    assert seq[-2:] == [("/tasks/paused",), ("/tasks/resumed",)]  # containerd pauses around the call
    if criu_cannot_dump():
        assert returncode == 1
        assert message.endswith(" path= <bundle>/criu-dump.log: unknown"), message
        assert errors, "criu's dump.log was copied into the bundle"
    else:
        assert (returncode, message, errors) == (0, "", None)


@pytest.fixture
def running(stack, busybox_image):
    """A detached pyrunc container: (container id, bundle, shim socket path)."""
    cid = uid("ck-api")
    stack.ctr("run", "-d", "--runtime", PYRUNC, busybox_image, cid, "sleep", "1000")
    bundle = bundle_of(stack, cid)
    yield cid, bundle, (bundle / "address").read_text().strip().removeprefix("unix://")
    cleanup(stack, cid)


def test_checkpoint_options_reach_runc_and_criu(running, tmp_path):
    """exit, work_path and the image path as our ttrpc client sends them (ctr sends none to pyrunc)."""
    cid, bundle, sock = running
    work, image = tmp_path / "work", tmp_path / "image"
    options = options_pb2.CheckpointOptions(exit=True, work_path=str(work))
    request = api.CheckpointTaskRequest(id=cid, path=str(image), options=any_pb2.Any(
        type_url=options.DESCRIPTOR.full_name, value=options.SerializeToString()))

    async def main():
        async with await Client.connect(sock) as client:
            try:
                await client.call(TASK, "Checkpoint", request, timeout=60)
                error = None
            except TTRPCError as e:
                error = e
            state = await client.call(TASK, "State", api.StateRequest(id=cid), api.StateResponse, timeout=10)
            return error, state

    error, state = asyncio.run(main())
    assert (work / "dump.log").exists(), "criu ran with the work dir asked for, which is kept"
    if criu_cannot_dump():
        assert error is not None and error.code == Code.UNKNOWN
        assert error.message.startswith("OCI runtime checkpoint failed: criu failed: ")
        assert error.message.endswith(f" path= {bundle}/criu-dump.log")
        assert (bundle / "criu-dump.log").read_text() == (work / "dump.log").read_text()
        assert state.status == types.RUNNING  # the failed dump stopped nothing
    else:
        assert error is None and (image / "inventory.img").exists()
        assert state.status == types.STOPPED or state.exit_status == 137  # exit=true: stopped after the dump


def test_create_from_a_checkpoint_restores_at_start_with_the_real_runc(running, busybox_rootfs, tmp_path):
    """Create prepares and runs nothing (pid 0, runc knows no such container); Start runs the real
    ``runc restore`` with our flags, which gets as far as reading the (empty) image; Delete then finds
    nothing to delete in runc and succeeds."""
    cid, bundle, sock = running
    new = f"ck-restore-{uuid.uuid4().hex[:6]}"
    new_bundle = tmp_path / "bundle"
    new_bundle.mkdir()
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": str(busybox_rootfs), "readonly": True}
    spec["linux"]["cgroupsPath"] = f"/pyrunc-test/{new}"
    (new_bundle / "config.json").write_text(json.dumps(spec))
    image = tmp_path / "image"
    image.mkdir()
    runc_root = f"/run/containerd/runc/{running[1].parent.name}"

    def runc_knows() -> bool:
        return subprocess.run(["runc", "--root", runc_root, "state", new], capture_output=True).returncode == 0

    async def main():
        async with await Client.connect(sock) as client:
            created = await client.call(TASK, "Create", api.CreateTaskRequest(
                id=new, bundle=str(new_bundle), checkpoint=str(image)), api.CreateTaskResponse, timeout=20)
            assert created.pid == 0
            assert not runc_knows()
            state = await client.call(TASK, "State", api.StateRequest(id=new), api.StateResponse, timeout=10)
            assert (state.status, state.pid) == (types.CREATED, 0)
            with pytest.raises(TTRPCError) as e:
                await client.call(TASK, "Start", api.StartRequest(id=new), timeout=60)
            state = await client.call(TASK, "State", api.StateRequest(id=new), api.StateResponse, timeout=10)
            await client.call(TASK, "Delete", api.DeleteRequest(id=new), timeout=20)
            return e.value, state

    error, state = asyncio.run(main())
    assert error.code == Code.UNKNOWN
    # runc took every flag and went on to read the image: no "flag provided but not defined"
    assert error.message.startswith("OCI runtime restore failed: "), error.message
    assert "descriptors.json" in error.message or "criu" in error.message, error.message
    assert (state.status, state.pid) == (types.CREATED, 0)
    assert not runc_knows()
    assert str(new_bundle) not in Path("/proc/self/mountinfo").read_text()


# -- the round trip: needs a criu that can dump here ------------------------------------------------

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done"


def count(stack, cid: str) -> int:
    r = stack.ctr("task", "exec", "--exec-id", uuid.uuid4().hex[:8], cid, "cat", "/tmp/n", check=False)
    return int(r.stdout.strip() or 0)


def wait_count(stack, cid: str, at_least: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = count(stack, cid)
        if n >= at_least:
            return n
        time.sleep(0.1)
    raise AssertionError(f"{cid}: counter at {n}, never reached {at_least}")


def test_checkpoint_and_restore_round_trip(stack, busybox_image):
    """A counting shell is checkpointed (left running), removed, and restored from the checkpoint
    image into a new container: it counts on from where it was, not from 1."""
    if why := criu_cannot_dump():
        pytest.skip(f"criu cannot dump on this machine: {why}")

    def scenario(runtime, tag):
        cid, restored = uid(f"ck-{tag}"), uid(f"rs-{tag}")
        image = ""
        events = Events(stack)
        try:
            stack.ctr("run", "-d", "--null-io", "--runtime", runtime, busybox_image, cid, "sh", "-c", COUNTER)
            before = wait_count(stack, cid, 30)
            image = stack.ctr("task", "checkpoint", cid).stdout.strip()
            still = wait_status(stack, cid, "RUNNING")
            cleanup(stack, cid)
            stack.ctr("run", "-d", "--null-io", "--runtime", runtime, "--checkpoint", image, busybox_image,
                      restored, "sh", "-c", COUNTER)
            status = wait_status(stack, restored, "RUNNING")
            time.sleep(0.5)
            counted_on = count(stack, restored) >= before  # a fresh start would be near 5 by now
        finally:
            seq = task_events(events.stop(), cid)
            cleanup(stack, cid)
            cleanup(stack, restored)
            if image:
                stack.ctr("image", "rm", image, check=False)
        assert (("/tasks/checkpointed",) in seq) == (tag == "py"), seq
        return still, status, counted_on

    assert set(RUNTIMES) == {"go", "py"}
    assert same(both(scenario)) == ("RUNNING", "RUNNING", True)
