"""Our shim's Task API called directly with our ttrpc client: what ctr cannot reach (CloseIO, errors)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim.api.containerd.runc.v1 import options_pb2
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.ttrpc import Client, Code, TTRPCError
from tools.stack import PYRUNC

TASK = "containerd.task.v2.Task"


@pytest.fixture
def running(containerd, busybox_image):
    """A detached pyrunc container: (container id, bundle path, shim socket path)."""
    cid = f"api-{uuid.uuid4().hex[:8]}"
    containerd.ctr("run", "-d", "--runtime", PYRUNC, busybox_image, cid, "sleep", "1000")
    bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / cid
    address = (bundle / "address").read_text().strip()
    yield cid, bundle, address.removeprefix("unix://")
    containerd.ctr("task", "kill", "-s", "KILL", cid, check=False)
    for _ in range(50):
        if containerd.ctr("task", "delete", cid, check=False).returncode == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    containerd.ctr("container", "delete", cid, check=False)


def exec_spec(bundle: Path, args: list[str]) -> any_pb2.Any:
    process = json.loads((bundle / "config.json").read_text())["process"]
    process["args"] = args
    process["terminal"] = False
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps(process).encode())


async def call(client: Client, method: str, request, response_type=None, timeout: float = 20):
    return await client.call(TASK, method, request, response_type, timeout=timeout)


def code_of(coro) -> int:
    async def main():
        try:
            await coro()
        except TTRPCError as e:
            return e.code
        return Code.OK

    return asyncio.run(main())


def test_exec_stdin_closeio_wait_pids_and_delete(running, tmp_path):
    cid, bundle, sock = running
    stdin = tmp_path / "stdin"
    stdout = tmp_path / "stdout"
    os.mkfifo(stdin)
    stdout.write_bytes(b"")

    async def main():
        async with await Client.connect(sock) as client:
            await call(client, "Exec", api.ExecProcessRequest(
                id=cid, exec_id="cat1", stdin=str(stdin), stdout=str(stdout), spec=exec_spec(bundle, ["cat"])))
            started = await call(client, "Start", api.StartRequest(id=cid, exec_id="cat1"), api.StartResponse)
            assert started.pid > 0
            pids = await call(client, "Pids", api.PidsRequest(id=cid), api.PidsResponse)
            details = {p.pid: options_pb2.ProcessDetails.FromString(p.info.value).exec_id
                       for p in pids.processes if p.info.type_url}
            assert details == {started.pid: "cat1"}
            assert [p.info.type_url for p in pids.processes if p.info.type_url] == ["containerd.runc.v1.ProcessDetails"]
            waiter = asyncio.ensure_future(
                call(client, "Wait", api.WaitRequest(id=cid, exec_id="cat1"), api.WaitResponse, timeout=30))
            fd = os.open(stdin, os.O_WRONLY)
            os.write(fd, b"through the shim\n")
            await asyncio.sleep(0.3)
            assert not waiter.done(), "cat must keep running until its stdin is closed"
            state = await call(client, "State", api.StateRequest(id=cid, exec_id="cat1"), api.StateResponse)
            assert (state.status, state.pid, state.exec_id) == (types.RUNNING, started.pid, "cat1")
            await call(client, "CloseIO", api.CloseIORequest(id=cid, exec_id="cat1", stdin=True))
            waited = await waiter
            os.close(fd)
            assert waited.exit_status == 0 and waited.exited_at.seconds > 0
            deleted = await call(client, "Delete", api.DeleteRequest(id=cid, exec_id="cat1"), api.DeleteResponse)
            assert (deleted.pid, deleted.exit_status) == (started.pid, 0)
            with pytest.raises(TTRPCError) as e:
                await call(client, "State", api.StateRequest(id=cid, exec_id="cat1"))
            assert e.value.code == Code.NOT_FOUND

    asyncio.run(main())
    assert stdout.read_bytes() == b"through the shim\n"


def test_errors_carry_the_codes_containerd_acts_on(running):
    cid, bundle, sock = running

    def on(method: str, request):
        async def go():
            async with await Client.connect(sock) as client:
                await call(client, method, request)
        return code_of(go)

    assert on("State", api.StateRequest(id="no-such-container")) == Code.NOT_FOUND
    assert on("Kill", api.KillRequest(id="no-such-container", signal=9)) == Code.NOT_FOUND
    assert on("State", api.StateRequest(id=cid, exec_id="no-such-exec")) == Code.NOT_FOUND
    assert on("Start", api.StartRequest(id=cid)) == Code.FAILED_PRECONDITION  # already running
    assert on("Delete", api.DeleteRequest(id=cid)) == Code.FAILED_PRECONDITION
    assert on("Resume", api.ResumeRequest(id=cid)) == Code.FAILED_PRECONDITION
    assert on("Kill", api.KillRequest(id=cid, signal=999)) == Code.INVALID_ARGUMENT
    assert on("Create", api.CreateTaskRequest(id=cid, bundle=str(bundle))) == Code.ALREADY_EXISTS
    assert on("Create", api.CreateTaskRequest(id="../escape", bundle=str(bundle))) == Code.INVALID_ARGUMENT
    bad_json = any_pb2.Any(type_url="x", value=b"{not json")
    assert on("Exec", api.ExecProcessRequest(id=cid, exec_id="bad", spec=bad_json)) == Code.INVALID_ARGUMENT
    assert on("Exec", api.ExecProcessRequest(id=cid, exec_id="../x", spec=exec_spec(bundle, ["true"]))) \
        == Code.INVALID_ARGUMENT
    assert on("Stats", api.StatsRequest(id="no-such-container")) == Code.NOT_FOUND
    assert on("Checkpoint", api.CheckpointTaskRequest(id=cid)) == Code.INVALID_ARGUMENT  # no image path
    assert on("NoSuchMethod", b"") == Code.UNIMPLEMENTED

    async def still_serving():
        async with await Client.connect(sock) as client:
            # Shutdown with a container left is a no-op; the shim keeps serving
            await call(client, "Shutdown", api.ShutdownRequest(id=cid))
            state = await call(client, "State", api.StateRequest(id=cid), api.StateResponse)
            assert state.status == types.RUNNING
            connect = await call(client, "Connect", api.ConnectRequest(id=cid), api.ConnectResponse)
            assert connect.task_pid == state.pid and connect.shim_pid > 0

    asyncio.run(still_serving())


def test_stats_are_cgroup_v1_metrics(running):
    from shim.api.cgroups.v1 import metrics_pb2

    cid, _, sock = running

    async def main():
        async with await Client.connect(sock) as client:
            return await call(client, "Stats", api.StatsRequest(id=cid), api.StatsResponse)

    stats = asyncio.run(main()).stats
    assert stats.type_url == "io.containerd.cgroups.v1.Metrics"
    metrics = metrics_pb2.Metrics.FromString(stats.value)
    assert metrics.memory.usage.usage > 0 and metrics.pids.current >= 1 and metrics.cpu.usage.total > 0


def test_v3_task_service_is_served(running):
    cid, _, sock = running

    async def main():
        async with await Client.connect(sock) as client:
            raw = await client.call("containerd.task.v3.Task", "State", api.StateRequest(id=cid), timeout=10)
            assert api.StateResponse.FromString(raw).status == types.RUNNING

    asyncio.run(main())
