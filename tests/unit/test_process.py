"""The process lifecycle tables and their errors."""

import asyncio

import pytest

from shim.process import EXEC_LIFECYCLE, INIT_LIFECYCLE, Process, State, Stdio
from shim.ttrpc import Code, TTRPCError


def make(is_init=True) -> Process:
    return Process("c1" if is_init else "e1", "c1", Stdio(), is_init=is_init)


def test_init_happy_path():
    p = make()
    for op, state in [("start", State.RUNNING), ("pause", State.PAUSED), ("resume", State.RUNNING)]:
        p.transition(op)
        assert p.state is state
    p.set_exited(3)
    assert (p.state, p.exit_status, p.exited) == (State.STOPPED, 3, True)
    assert p.exited_at_ns > 0
    p.transition("delete")
    assert p.state is State.DELETED


@pytest.mark.parametrize(
    "ops, refused, message",
    [
        ([], "pause", "cannot pause a created container"),
        ([], "resume", "cannot resume a created container"),
        (["start"], "start", "cannot start a running process"),
        (["start"], "delete", "cannot delete a running process"),
        (["start", "pause"], "delete", "cannot delete a paused process"),
        (["start", "pause"], "pause", "cannot pause a paused container"),
        (["start", "exit"], "start", "cannot start a stopped process"),
        (["delete"], "delete", "cannot delete a deleted process"),
        (["delete"], "start", "cannot start a deleted process"),
    ],
)
def test_init_refusals_are_failed_precondition(ops, refused, message):
    p = make()
    for op in ops:
        p.transition(op)
    state = p.state
    with pytest.raises(TTRPCError) as e:
        p.transition(refused)
    assert (e.value.code, e.value.message) == (Code.FAILED_PRECONDITION, message)
    assert p.state is state  # a refused transition changes nothing


def test_exec_cannot_pause_and_tables_agree():
    p = make(is_init=False)
    p.transition("start")
    with pytest.raises(TTRPCError):
        p.transition("pause")
    assert set(EXEC_LIFECYCLE) == set(INIT_LIFECYCLE) - {"pause", "resume", "update", "checkpoint"}
    for op, table in EXEC_LIFECYCLE.items():
        assert table == INIT_LIFECYCLE[op]


def test_exit_of_deleted_process_keeps_it_deleted_and_wakes_waiters():
    async def main():
        p = make()
        p.pid = 4242  # a created init has a pid: runc delete kills it, and its exit follows
        p.transition("delete")
        waiter = asyncio.ensure_future(p.wait())
        await asyncio.sleep(0)
        p.set_exited(137)
        await asyncio.wait_for(waiter, 1)
        assert (p.state, p.exit_status) == (State.DELETED, 137)

    asyncio.run(main())


def test_wait_on_an_exec_deleted_before_it_started_is_not_found():
    async def main():
        p = make(is_init=False)
        waiter = asyncio.ensure_future(p.wait())
        await asyncio.sleep(0)
        p.transition("delete")
        with pytest.raises(TTRPCError) as e:
            await asyncio.wait_for(waiter, 1)
        assert e.value.code == Code.NOT_FOUND

    asyncio.run(main())
