"""Processes of a container — its init and its execs — with their lifecycle as an explicit table.

A state change goes through :meth:`Process.transition`, which refuses what the table does not allow
with FailedPrecondition (containerd's Go shim answers those with plain errors → Unknown; the precise
code is what containerd's clients act on). Exits are recorded with :meth:`Process.set_exited`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass

from shim.ttrpc import Code, TTRPCError


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


S = State
# operation → {from state: to state}; anything missing is refused
INIT_LIFECYCLE: dict[str, dict[State, State]] = {
    "start": {S.CREATED: S.RUNNING},
    "pause": {S.RUNNING: S.PAUSED},
    "resume": {S.PAUSED: S.RUNNING},
    "exit": {S.CREATED: S.STOPPED, S.RUNNING: S.STOPPED, S.PAUSED: S.STOPPED},
    "delete": {S.CREATED: S.DELETED, S.STOPPED: S.DELETED},
    # operations on a live container that leave its state as it is
    "update": {S.CREATED: S.CREATED, S.RUNNING: S.RUNNING, S.PAUSED: S.PAUSED},
    "checkpoint": {S.RUNNING: S.RUNNING, S.PAUSED: S.PAUSED},
}
_CONTAINER_OPS = ("pause", "resume", "update", "checkpoint")
EXEC_LIFECYCLE: dict[str, dict[State, State]] = {
    op: table for op, table in INIT_LIFECYCLE.items() if op not in _CONTAINER_OPS
}


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Process:
    """One process: its pid once known, its state, and its exit (awaitable)."""

    def __init__(self, id: str, container_id: str, stdio: Stdio, *, is_init: bool) -> None:
        self.id = id  # the exec id, or the container id for the init process
        self.container_id = container_id
        self.stdio = stdio
        self.is_init = is_init
        self.lifecycle = INIT_LIFECYCLE if is_init else EXEC_LIFECYCLE
        self.state = State.CREATED
        self.pid = 0
        self.reaped = False  # set by the exit monitor the moment the reaper hands over the status
        self.exit_status = 0
        self.exited_at_ns = 0
        self.io: object | None = None  # the stdio plumbing (shim.stdio.ProcessIO) while it is open
        self.spec: bytes = b""  # an exec's OCI process JSON
        self._exited = asyncio.Event()
        self._settled = asyncio.Event()  # exited, or deleted without ever running: Wait can answer
        # Set while no Start is in flight: an exit seen during Start waits for the start event (7111).
        # A Checkpoint clears it too, so that an exit it causes (exit=true) follows /tasks/checkpointed.
        self.not_starting = asyncio.Event()
        self.not_starting.set()

    @property
    def exec_id(self) -> str:
        return "" if self.is_init else self.id

    def can(self, op: str) -> bool:
        return self.state in self.lifecycle.get(op, {})

    def check(self, op: str) -> None:
        if not self.can(op):
            kind = "container" if self.is_init and op in _CONTAINER_OPS else "process"
            raise TTRPCError(Code.FAILED_PRECONDITION, f"cannot {op} a {self.state.value} {kind}")

    def transition(self, op: str) -> None:
        self.check(op)
        self.state = self.lifecycle[op][self.state]
        if self.state is State.DELETED and not self.pid:
            self._settled.set()  # an exec deleted before it was started will never exit

    def set_exited(self, status: int) -> None:
        """Record the exit; a deleted process stays deleted."""
        if self.can("exit"):
            self.state = State.STOPPED
        self.exit_status = status
        self.exited_at_ns = time.time_ns()
        self._exited.set()
        self._settled.set()

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def wait(self) -> None:
        """Until the process exits; NotFound if it is deleted without ever having run."""
        await self._settled.wait()
        if not self._exited.is_set():
            raise TTRPCError(Code.NOT_FOUND, f"process {self.id} was deleted before it started")
