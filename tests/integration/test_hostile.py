"""Hostile input at the Task API: valid-but-odd requests get clear codes; the shim never crashes or sticks."""

from __future__ import annotations

import asyncio
import os
import random
import uuid

from google.protobuf import any_pb2

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import mount_pb2
from shim.api.containerd.types import task_pb2 as types
from shim.ttrpc import Client, Code, TTRPCError
from tests.integration.test_shim import wait_status
from tests.integration.test_task_api import exec_spec
from tools.stack import PYRUNC

TASK = "containerd.task.v2.Task"
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS,
           Code.UNIMPLEMENTED}


def odd_requests(rng: random.Random, cid: str, spec: any_pb2.Any, tmp: str):
    ids = [cid, "nope", "", "../escape", "a/b", "x\x00y", "z" * 300, "é", ".", ".."]
    exec_ids = ["", "e-" + uuid.uuid4().hex[:4], "../e", "y" * 300, "bad\x00id"]
    paths = ["", f"{tmp}/missing/fifo", "/" + "p" * 5000, "relative/path", "/dev/null"]
    specs = [spec, any_pb2.Any(type_url="x", value=b"{not json"), any_pb2.Any(),
             any_pb2.Any(type_url="y", value=b"[1,2,3]"), any_pb2.Any(type_url="z", value=b"\xff" * 10)]
    for n in range(1200):
        pick = rng.choice
        i = cid if rng.random() < 0.4 else pick(ids)
        e = f"e{n}" if rng.random() < 0.3 else pick(exec_ids)
        method = pick(["State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Kill", "Exec", "ResizePty",
                       "CloseIO", "Update", "Wait", "Stats", "Connect", "Checkpoint", "Bogus"])
        if method == "Create":
            req = api.CreateTaskRequest(id=i, bundle=pick(["", tmp, "/nonexistent", "rel"]), stdout=pick(paths),
                                        rootfs=[mount_pb2.Mount(type="tmpfs", source="none",
                                                                options=["size=" + pick(["1m", "-1", "x"])])])
        elif method == "Exec":
            req = api.ExecProcessRequest(id=i, exec_id=e, stdin=pick(paths), stdout=pick(paths),
                                         stderr=pick(paths), spec=pick(specs), terminal=rng.random() < 0.1)
        elif method == "Kill":
            # never a deadly signal at the real container: the point is the shim, not the container
            sig = pick([0, 999, -1 & 0xFFFFFFFF, 65]) if i == cid else pick([0, 9, 15, 999])
            req = api.KillRequest(id=i, exec_id=e, signal=sig, all=rng.random() < 0.5)
        elif method == "Wait":
            if i == cid and e == "":
                continue  # would rightly block until the container exits
            req = api.WaitRequest(id=i, exec_id=e)
        elif method == "ResizePty":
            req = api.ResizePtyRequest(id=i, exec_id=e, width=rng.randrange(1 << 32), height=rng.randrange(1 << 32))
        elif method == "Bogus":
            req = os.urandom(rng.randrange(64))
        else:
            cls = getattr(api, {"State": "StateRequest", "Start": "StartRequest", "Delete": "DeleteRequest",
                                "Pids": "PidsRequest", "Pause": "PauseRequest", "Resume": "ResumeRequest",
                                "CloseIO": "CloseIORequest", "Update": "UpdateTaskRequest", "Stats": "StatsRequest",
                                "Connect": "ConnectRequest", "Checkpoint": "CheckpointTaskRequest"}[method])
            req = cls(id=i)
            if "exec_id" in cls.DESCRIPTOR.fields_by_name:
                req.exec_id = e
        yield method, req


def test_odd_requests_get_clear_codes_and_the_shim_survives(containerd, busybox_image, tmp_path):
    cid = f"hostile-{uuid.uuid4().hex[:6]}"
    containerd.ctr("run", "-d", "--runtime", PYRUNC, busybox_image, cid, "sleep", "1000")
    bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / cid
    sock = (bundle / "address").read_text().strip().removeprefix("unix://")
    spec = exec_spec(bundle, ["true"])
    seen: dict[str, set[int]] = {}

    async def main() -> None:
        async with await Client.connect(sock) as client:
            shim_pid = (await client.call(TASK, "Connect", api.ConnectRequest(id=cid), api.ConnectResponse)).shim_pid
            fds_before = len(os.listdir(f"/proc/{shim_pid}/fd"))
            for method, req in odd_requests(random.Random(1234), cid, spec, str(tmp_path)):
                try:
                    # Wait on a process that exists but never runs rightly blocks: give it a short deadline
                    await client.call(TASK, method, req, timeout=0.2 if method == "Wait" else 20)
                    code = Code.OK
                except TTRPCError as e:
                    code = e.code
                    assert code in ALLOWED or (method == "Wait" and code == Code.DEADLINE_EXCEEDED) \
                        or (code == Code.UNKNOWN and ("OCI runtime" in e.message or "process I/O" in e.message)), \
                        f"{method} {req!r:.200}: {e}"
                seen.setdefault(method, set()).add(int(code))
            state = await client.call(TASK, "State", api.StateRequest(id=cid), api.StateResponse, timeout=10)
            assert state.status in (types.RUNNING, types.PAUSED)
            if state.status == types.PAUSED:
                await client.call(TASK, "Resume", api.ResumeRequest(id=cid), timeout=10)
            await asyncio.sleep(0.5)
            fds_after = len(os.listdir(f"/proc/{shim_pid}/fd"))
            assert fds_after <= fds_before + 2, f"shim fds {fds_before} → {fds_after}"

    try:
        asyncio.run(main())
        assert seen["Bogus"] == {Code.UNIMPLEMENTED}
        assert {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND} <= seen["Exec"]
        assert {Code.INVALID_ARGUMENT, Code.NOT_FOUND} <= seen["Kill"]
        assert {Code.OK, Code.NOT_FOUND} <= seen["State"]
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", cid, check=False)
        wait_status(containerd, cid, "STOPPED")
        containerd.ctr("task", "delete", cid, check=False)
        containerd.ctr("container", "delete", cid, check=False)
