"""The races containerd's Go shim hit, one test each, named after the containerd issue."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.ttrpc import Client, Code, TTRPCError
from tests.integration.test_shim import Events, task_events, wait_status
from tests.integration.test_task_api import exec_spec
from tools.stack import PYRUNC

TASK = "containerd.task.v2.Task"


def start_detached(stack, image: str, *cmd: str) -> tuple[str, object, str]:
    cid = f"race-{uuid.uuid4().hex[:8]}"
    stack.ctr("run", "-d", "--runtime", PYRUNC, image, cid, *cmd)
    bundle = stack.state / "io.containerd.runtime.v2.task" / stack.namespace / cid
    return cid, bundle, (bundle / "address").read_text().strip().removeprefix("unix://")


def remove(stack, cid: str) -> None:
    stack.ctr("task", "kill", "-s", "KILL", cid, check=False)
    wait_status(stack, cid, "STOPPED")
    stack.ctr("task", "delete", cid, check=False)
    stack.ctr("container", "delete", cid, check=False)


def test_7111_exit_racing_start_is_published_after_the_start_event(containerd, busybox_image):
    events = Events(containerd)
    cids = [f"r7111-{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: containerd.ctr("run", "--rm", "--runtime", PYRUNC, busybox_image, c, "true"), cids))
    seen = events.stop()
    for cid in cids:
        assert task_events(seen, cid) == [("/tasks/create",), ("/tasks/start",), ("/tasks/exit", "init", 0),
                                          ("/tasks/delete", 0)]


def test_9719_10589_exec_exits_come_before_init_exit_while_execs_start(containerd, busybox_image):
    """Execs keep being started while init exits: every started exec's exit precedes init's, none hangs."""
    events = Events(containerd)
    cid, bundle, sock = start_detached(containerd, busybox_image, "sh", "-c", "sleep 1; exit 5")

    async def main() -> list[int]:
        async with await Client.connect(sock) as client:
            outcomes = []
            for n in range(400):
                try:
                    await client.call(TASK, "Exec", api.ExecProcessRequest(
                        id=cid, exec_id=f"x{n}", spec=exec_spec(bundle, ["sleep", "100"])), timeout=10)
                    await client.call(TASK, "Start", api.StartRequest(id=cid, exec_id=f"x{n}"), timeout=10)
                    outcomes.append(0)
                except TTRPCError as e:
                    assert e.code in (Code.FAILED_PRECONDITION, Code.UNKNOWN, Code.NOT_FOUND), e
                    outcomes.append(int(e.code))
                    if e.code == Code.FAILED_PRECONDITION:
                        break  # init has exited: no more execs
            return outcomes

    try:
        outcomes = asyncio.run(main())
        assert wait_status(containerd, cid, "STOPPED", timeout=20) == "STOPPED"
    finally:
        seq = task_events(events.stop(), cid)
        remove(containerd, cid)
    assert outcomes.count(0) >= 1
    exits = [e for e in seq if e[0] == "/tasks/exit"]
    assert exits[-1] == ("/tasks/exit", "init", 5)
    assert len([e for e in exits if e[1] != "init"]) == outcomes.count(0), "every started exec exited once"


def test_9999_concurrent_execs_all_answer(containerd, busybox_image):
    cid, bundle, sock = start_detached(containerd, busybox_image, "sleep", "1000")

    async def one(client: Client, n: int) -> int:
        exec_id = f"c{n}"
        await client.call(TASK, "Exec", api.ExecProcessRequest(
            id=cid, exec_id=exec_id, spec=exec_spec(bundle, ["sh", "-c", f"exit {n % 7}"])), timeout=20)
        wait = asyncio.ensure_future(client.call(TASK, "Wait", api.WaitRequest(id=cid, exec_id=exec_id),
                                                 api.WaitResponse, timeout=30))
        await client.call(TASK, "Start", api.StartRequest(id=cid, exec_id=exec_id), timeout=20)
        status = (await wait).exit_status
        await client.call(TASK, "Delete", api.DeleteRequest(id=cid, exec_id=exec_id), timeout=20)
        return status

    async def main() -> list[int]:
        async with await Client.connect(sock) as client:
            return await asyncio.gather(*(one(client, n) for n in range(40)))

    try:
        assert asyncio.run(main()) == [n % 7 for n in range(40)]
    finally:
        remove(containerd, cid)


def test_delete_during_wait_and_kill_during_start(containerd, busybox_image):
    cid, bundle, sock = start_detached(containerd, busybox_image, "sleep", "1000")

    async def main() -> None:
        async with await Client.connect(sock) as client:
            await client.call(TASK, "Exec", api.ExecProcessRequest(
                id=cid, exec_id="w", spec=exec_spec(bundle, ["sleep", "100"])), timeout=10)
            start = asyncio.ensure_future(client.call(TASK, "Start", api.StartRequest(id=cid, exec_id="w"),
                                                      api.StartResponse, timeout=10))
            kill = asyncio.ensure_future(client.call(TASK, "Kill", api.KillRequest(id=cid, exec_id="w", signal=9),
                                                     timeout=10))
            started = await start
            try:
                await kill  # may have come before the pid was known
            except TTRPCError as e:
                assert e.code == Code.FAILED_PRECONDITION
                await client.call(TASK, "Kill", api.KillRequest(id=cid, exec_id="w", signal=9), timeout=10)
            wait = asyncio.ensure_future(client.call(TASK, "Wait", api.WaitRequest(id=cid, exec_id="w"),
                                                     api.WaitResponse, timeout=10))
            await asyncio.sleep(0.05)  # the Wait is on the wire before the Delete
            deleted = await client.call(TASK, "Delete", api.DeleteRequest(id=cid, exec_id="w"), api.DeleteResponse,
                                        timeout=10)
            waited = await wait
            assert (deleted.pid, deleted.exit_status, waited.exit_status) == (started.pid, 137, 137)

    try:
        asyncio.run(main())
    finally:
        remove(containerd, cid)


def test_grouped_creates_at_once(containerd, busybox_image):
    group = f"grp-{uuid.uuid4().hex[:6]}"
    cids = [f"gc{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]

    def run(cid: str):
        return containerd.ctr("run", "-d", "--runtime", PYRUNC, "--annotation",
                              f"io.containerd.runc.v2.group={group}", busybox_image, cid, "sleep", "1000")

    try:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(run, cids))
        for cid in cids:
            assert wait_status(containerd, cid, "RUNNING") == "RUNNING"
        addresses = {(containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / c / "address")
                     .read_text() for c in cids}
        assert len(addresses) == 1
    finally:
        for cid in cids:
            remove(containerd, cid)
