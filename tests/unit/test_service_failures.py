"""What the Task service answers when runc, its output or the shim's own files fail, against the fake
runc of test_checkpoint: the codes containerd acts on, and nothing left running behind."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim import cgroups
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.ttrpc import Code
from tests.unit.test_checkpoint import (  # noqa: F401 - no_cgroups and subreaper: autouse fixtures
    CID,
    GLOBAL_FLAGS,
    Fake,
    Stack,
    code_of,
    kill_and_delete,
    no_cgroups,
    p_gone,
    run,
    subreaper,
)

EXEC = "e1"


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


async def add_exec(s: Stack) -> None:
    await s.acall("Exec", api.ExecProcessRequest(id=CID, exec_id=EXEC, spec=any_pb2.Any(value=b"{}")))


async def until_gone(pids: list[int]) -> None:
    """Until the reaper has collected each of ``pids`` (killed by the shim, or by the test)."""
    for _ in range(250):
        if all(p_gone(pid) for pid in pids):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still running: {[pid for pid in pids if not p_gone(pid)]}")


def test_a_bad_pid_file_is_the_runtimes_failure_never_the_callers(tmp_path: Path, fake: Fake) -> None:
    """runc succeeded but left no usable pid in the file the shim named: Unknown, saying so; a missing
    init.pid is not the caller's NotFound."""
    async def test(s: Stack) -> None:
        fake.behave(create={"no_pid": True})
        code, message = await code_of(s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle))))
        assert (code, message) == (
            Code.UNKNOWN, f"OCI runtime create failed: bad pid file {s.bundle}/init.pid: No such file or directory")
        await until_gone(fake.spawned())  # deleted with --force, as any create failing after runc's

        fake.behave()
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
        await s.acall("Start", api.StartRequest(id=CID))
        await add_exec(s)
        fake.behave(exec={"bad_pid": True})
        code, message = await code_of(s.acall("Start", api.StartRequest(id=CID, exec_id=EXEC)))
        assert (code, message) == (Code.UNKNOWN, f"OCI runtime exec failed: bad pid file {s.bundle}/{EXEC}.pid: "
                                                 "invalid literal for int() with base 10: 'not-a-pid'")
        assert s.service.containers[CID].execs[EXEC].io is None, "its I/O is closed"
        assert (await s.acall("State", api.StateRequest(id=CID, exec_id=EXEC))).pid == 0
        await s.acall("Delete", api.DeleteRequest(id=CID, exec_id=EXEC))
        # Its pid unknown, the exec'd process cannot be told from the container's others: ours to end.
        exec_pid = fake.spawned()[-1]
        os.kill(exec_pid, signal.SIGKILL)
        await until_gone([exec_pid])
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_runc_ps_output_that_does_not_parse_is_internal(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
        for output in ("not json", '[{"pid": 1}]'):
            fake.behave(ps={"stdout": output})
            code, message = await code_of(s.acall("Pids", api.PidsRequest(id=CID)))
            assert code == Code.INTERNAL and message.startswith("runc ps printed no JSON list of pids: "), message
        fake.behave(ps={"stdout": f"[{fake.init_pid()}]"})
        assert [p.pid for p in (await s.acall("Pids", api.PidsRequest(id=CID))).processes] == [fake.init_pid()]
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_cgroup_statistics_that_do_not_parse_are_internal(tmp_path: Path, fake: Fake, monkeypatch) -> None:
    def unparsable(cg: cgroups.Cgroup) -> any_pb2.Any:
        raise ValueError("not an integer: 'garbage'")

    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
        s.service.cgroups[CID] = cgroups.CgroupV2(str(tmp_path))
        monkeypatch.setattr(cgroups, "stats", unparsable)
        assert await code_of(s.acall("Stats", api.StatsRequest(id=CID))) == (
            Code.INTERNAL, "cannot parse the cgroup's statistics: not an integer: 'garbage'")
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_options_json_that_cannot_be_written_is_internal(tmp_path: Path, fake: Fake) -> None:
    """The shim's own file in the bundle: its errno (here EISDIR) is no InvalidArgument of the request."""
    async def test(s: Stack) -> None:
        (s.bundle / "options.json").mkdir()
        code, message = await code_of(s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle))))
        assert (code, message) == (
            Code.INTERNAL, f"cannot save runtime options to {s.bundle}/options.json: Is a directory")
        assert fake.calls() == [] and CID not in s.service.containers

    run(tmp_path, fake, test)


def test_an_exec_whose_caller_goes_away_during_runc_exec_is_killed(tmp_path: Path, fake: Fake) -> None:
    """The Start call is cancelled while runc exec runs: the exec'd process (nobody will be told of it)
    is killed once runc returns, its exit collected, and the exec is left as never started."""
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
        await s.acall("Start", api.StartRequest(id=CID))
        await add_exec(s)
        waiting = asyncio.ensure_future(s.acall("Wait", api.WaitRequest(id=CID, exec_id=EXEC)))
        fake.behave(exec={"delay": 0.5})
        starting = asyncio.ensure_future(s.acall("Start", api.StartRequest(id=CID, exec_id=EXEC)))
        while len(fake.spawned()) < 2:  # runc exec has made the process, and is still at work
            await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await until_gone([fake.spawned()[-1]])
        state = await s.acall("State", api.StateRequest(id=CID, exec_id=EXEC))
        assert (state.status, state.pid) == (types.CREATED, 0)
        assert s.service.containers[CID].execs[EXEC].io is None, "its I/O is closed"
        await s.acall("Delete", api.DeleteRequest(id=CID, exec_id=EXEC))
        assert await code_of(waiting) == (Code.NOT_FOUND, f"process {EXEC} was deleted before it started")
        assert s.topics() == ["TaskCreate", "TaskStart", "TaskExecAdded"]
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_an_init_start_whose_caller_goes_away_during_runc_start_completes(tmp_path: Path, fake: Fake) -> None:
    """As the Go shim: once runc start runs, the init is started, recorded as running and announced,
    whether or not the caller is still there to hear it."""
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
        fake.behave(start={"delay": 0.3})
        starting = asyncio.ensure_future(s.acall("Start", api.StartRequest(id=CID)))
        while not any("start" in call for call in fake.calls()):
            await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        for _ in range(100):
            if (await s.acall("State", api.StateRequest(id=CID))).status == types.RUNNING:
                break
            await asyncio.sleep(0.02)
        assert (await s.acall("State", api.StateRequest(id=CID))).status == types.RUNNING
        assert s.topics() == ["TaskCreate", "TaskStart"]
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_a_restore_whose_caller_goes_away_during_runc_restore_is_undone(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), checkpoint="/img"))
        fake.behave(restore={"delay": 0.5})
        starting = asyncio.ensure_future(s.acall("Start", api.StartRequest(id=CID)))
        while not fake.spawned():
            await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await until_gone(fake.spawned())  # killed, and collected by the reaper
        init = s.service.containers[CID].init
        for _ in range(100):  # a Start or Delete is refused until the cleanup is done
            if init.not_starting.is_set():
                break
            await asyncio.sleep(0.02)
        assert [argv[GLOBAL_FLAGS:] for argv in fake.calls()][-1] == ["delete", "--force", CID], "removed from runc"
        state = await s.acall("State", api.StateRequest(id=CID))
        assert (state.status, state.pid) == (types.CREATED, 0)
        assert s.topics() == ["TaskCreate"]
        fake.behave(delete={"error": f"container {CID} does not exist"})
        await s.acall("Delete", api.DeleteRequest(id=CID))
        assert s.topics() == ["TaskCreate", "TaskDelete"]

    run(tmp_path, fake, test)


def test_a_restore_failing_after_runc_restored_deletes_it_from_runc(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), checkpoint="/img"))
        fake.behave(restore={"bad_pid": True})
        code, message = await code_of(s.acall("Start", api.StartRequest(id=CID)))
        assert (code, message) == (Code.UNKNOWN, f"OCI runtime restore failed: bad pid file {s.bundle}/init.pid: "
                                                 "invalid literal for int() with base 10: 'not-a-pid'")
        assert [argv[GLOBAL_FLAGS:] for argv in fake.calls()] == [
            ["restore", "--image-path", "/img", "--detach", "--pid-file", f"{s.bundle}/init.pid", "--no-subreaper",
             "--bundle", str(s.bundle), CID],
            ["delete", "--force", CID]]
        await until_gone(fake.spawned())
        assert (await s.acall("State", api.StateRequest(id=CID))).status == types.CREATED
        fake.behave(delete={"error": f"container {CID} does not exist"})
        await s.acall("Delete", api.DeleteRequest(id=CID))

    run(tmp_path, fake, test)
