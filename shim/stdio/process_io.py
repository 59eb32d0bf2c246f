"""A process's stdio: what runc gives the process, and what the shim runs for it meanwhile.

Without a terminal, the process writes straight into its destination: stdout gets a write end of
containerd's FIFO (or of the log file, or of the logger's pipe) itself, so its bytes never pass
through the shim. stderr goes through a pipe spliced into the
destination by the shim, because runc prints its own failures on the stderr the process inherits and
the Go shim never shows that text to the client (it starts copying only once runc succeeded) — except
with a ``binary://`` logger, which gets the process's stderr pipe directly, as in Go. stdin is relayed
from containerd's FIFO into a pipe, so that CloseIO can end it while the client still holds the FIFO.

With a terminal, runc sends the pty master through a console socket; the shim relays master →
stdout destination and stdin FIFO → master (there is no separate stderr, as in Go) and sets the
window size on the master for ResizePty.

Lifecycle, driven by shim.container: ``await open()`` → runc create/exec with ``runc_io()`` →
``await start()`` → … → ``await drain()`` when the process exited (before its exit is reported) →
``close_stdin()`` → ``close()`` on delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from typing import Any

from shim.process import Stdio
from shim.reaper import Reaper
from shim.stdio import fifo, uri
from shim.stdio.console import ConsoleSocket, input_consumed, set_window_size
from shim.stdio.logger import BinaryLogger, LoggerError
from shim.stdio.relay import Relay
from shim.ttrpc import Code, TTRPCError

log = logging.getLogger("pyrunc.stdio")

CONSOLE_TIMEOUT = 10.0  # runc has returned when we wait: the master is normally queued already
TTY_SETTLE = 0.05  # at exit, a pty still held open elsewhere may have bytes in flight: wait this long
HANGUP_GRACE = 1.0  # CloseIO on a terminal: wait at most this long for the process to read its input
FIFO_STALL = 0.25  # at exit, a FIFO whose reader took nothing for this long is not being read
FIFO_CAP = 10.0  # and a FIFO being read is waited for at most this long


class ProcessIO:
    """The stdio plumbing of one process (init or exec); see the module docstring."""

    def __init__(self, stdio: Stdio, name: str, is_init: bool = True, io_uid: int = 0, io_gid: int = 0) -> None:
        self.stdio = stdio
        self.io_owner = (io_uid, io_gid)  # owner of the pipes the process gets (Options.io_uid/io_gid)
        self.is_init = is_init
        self.terminal = stdio.terminal
        self.name = name
        self.child_fds: list[int] = []  # stdin, stdout, stderr for runc, without a terminal
        self._keep: dict[str, int] = {}  # FIFO keeper read ends
        self._stdin: Relay | None = None
        self._stdin_src: int | None = None  # the stdin FIFO before its relay exists (terminal)
        self._stderr: Relay | None = None
        self._output: Relay | None = None  # master → stdout destination (terminal)
        self._sink: int | None = None  # the terminal's stdout destination before the relay starts
        self._console: ConsoleSocket | None = None
        self._receiving: asyncio.Task[int] | None = None
        self.master: int | None = None
        self._logger: BinaryLogger | None = None
        self._stdin_closed = False
        self._hanging_up: asyncio.Task[None] | None = None
        self._exited = False
        self.closed = False

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    async def open(cls, stdio: Stdio, *, reaper: Reaper, namespace: str, process_id: str,
                   is_init: bool = True, io_uid: int = 0, io_gid: int = 0) -> ProcessIO:
        """Open the destinations (start a ``binary://`` logger and wait until it is ready).

        ``io_uid``/``io_gid``: when set, the pipes the shim creates for the process are chowned to them,
        as Go does, so a container user (of a user namespace, say) can reopen its /proc/self/fd/0 or 2.

        Errors are TTRPCError Unknown worded as the Go shim's ("failed to create init process I/O: …").
        """
        kind = "init" if is_init else "exec"
        pio = cls(stdio, f"{kind} {process_id}", is_init, io_uid, io_gid)
        try:
            target = uri.parse(stdio.stdout)
            if target.kind == "binary":
                pio._logger = await BinaryLogger.start(reaper, target.path, target.args, process_id=process_id,
                                                       namespace=namespace)
            if stdio.terminal:
                pio._open_terminal(target)
            else:
                pio._open_pipes(target)
        except BaseException as e:
            pio.close()
            if isinstance(e, uri.StdioURIError | LoggerError | fifo.OpenError | OSError):
                raise TTRPCError(Code.UNKNOWN, f"failed to create {kind} process I/O: {e}") from e
            raise
        return pio

    def _open_sink(self, target: uri.Target, path: str) -> int:
        """A new write end on the destination of one stream (``path``: that stream's own field)."""
        if target.kind == "file":
            return fifo.open_log_file(target.path)
        if target.kind == "binary":
            assert self._logger is not None and self._logger.stdout_w is not None
            return os.dup(self._logger.stdout_w)
        return fifo.open_output(path, self._keep) if path else fifo.devnull(write=True)

    def _open_pipes(self, target: uri.Target) -> None:
        s = self.stdio
        if s.stdin and target.kind != "binary":  # Go gives a binary logger's process no stdin
            self._stdin_src = fifo.open_stdin(s.stdin)
            r, w = os.pipe2(os.O_CLOEXEC)
            self.child_fds.append(r)
            self._stdin, self._stdin_src = Relay(self._stdin_src, w, name=f"{self.name} stdin"), None
            self._chown(r)
        else:
            self.child_fds.append(fifo.devnull(write=False))
        if target.kind == "binary":
            logger = self._logger
            assert logger is not None and logger.stdout_w is not None and logger.stderr_w is not None
            self.child_fds += [os.dup(logger.stdout_w), os.dup(logger.stderr_w)]
            return
        self.child_fds.append(self._open_sink(target, s.stdout))
        if not s.stderr:
            self.child_fds.append(fifo.devnull(write=True))
            return
        sink = self._open_sink(target, s.stderr)
        r, w = os.pipe2(os.O_CLOEXEC)
        self.child_fds.append(w)
        with contextlib.suppress(OSError):  # a bigger pipe only saves wake-ups; the default works
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, fifo.PIPE_SIZE)
        self._stderr = Relay(r, sink, name=f"{self.name} stderr")
        self._chown(w)

    def _chown(self, fd: int) -> None:
        """Give a pipe we made for the process to io_uid/io_gid. Only our own pipes: stdout is the
        client's FIFO or file itself (chowning it would change their file), and Go leaves a
        ``binary://`` logger's pipes and the console socket (runc, as root, connects to it) as they are."""
        if self.io_owner != (0, 0):
            os.fchown(fd, *self.io_owner)

    def _open_terminal(self, target: uri.Target) -> None:
        if self.stdio.stdin:
            self._stdin_src = fifo.open_stdin(self.stdio.stdin)
        self._sink = self._open_sink(target, self.stdio.stdout)
        if self._logger is not None:
            self._logger.release()  # its stderr pipe gets no writer at all: the logger sees EOF on fd 4
        self._console = ConsoleSocket()
        self._receiving = asyncio.get_running_loop().create_task(self._console.receive())

    def runc_io(self) -> dict[str, Any]:
        """Keyword arguments for Runc.create/exec: the console socket, or the process's three fds."""
        if self._console is not None:
            return {"console_socket": self._console.path}
        return {"stdin": self.child_fds[0], "stdout": self.child_fds[1], "stderr": self.child_fds[2]}

    # -- running -------------------------------------------------------------------------------
    async def start(self) -> None:
        """After runc created the process: drop our copies of its fds, get its terminal, start relaying."""
        self.release_child_ends()
        if self._logger is not None:
            self._logger.release()
        if self._receiving is not None:
            await self._receive_master()
        for relay in (self._stdin, self._stderr, self._output):
            if relay is not None:
                relay.start()
        if self._stdin_closed:  # CloseIO came while the process was being started
            self.close_stdin()

    async def _receive_master(self) -> None:
        assert self._receiving is not None and self._console is not None
        try:
            self.master = await asyncio.wait_for(asyncio.shield(self._receiving), CONSOLE_TIMEOUT)
        except (OSError, TimeoutError) as e:
            reason = str(e) or f"nothing received within {CONSOLE_TIMEOUT:g}s"
            raise TTRPCError(Code.UNKNOWN, f"failed to retrieve console master: {reason}") from e
        finally:
            self._stop_receiving()
        assert self._sink is not None
        self._output = Relay(self.master, self._sink, name=f"{self.name} console", close_src=False)
        self._sink = None
        if self._stdin_src is not None:
            self._stdin = Relay(self._stdin_src, self.master, name=f"{self.name} console stdin",
                                close_dst=False, on_end=self._hang_up)
            self._stdin_src = None

    def _stop_receiving(self) -> None:
        """Drop the console socket (and a master that arrived after all)."""
        task, console = self._receiving, self._console
        self._receiving = self._console = None
        if task is None or console is None:
            return

        def done(t: asyncio.Task[int]) -> None:
            if not t.cancelled() and t.exception() is None and t.result() != self.master:
                os.close(t.result())  # it came after all, but nobody took it
            console.close()

        if task.done():
            done(task)
        else:
            # The cancelled accept unregisters its fd from the loop only at the loop's next turn:
            # closing the socket before that could let a new fd take its number and lose its reader.
            task.cancel()
            task.add_done_callback(done)

    def release_child_ends(self) -> None:
        """After runc has handed them to the process: holding them would keep readers from EOF."""
        for fd in set(self.child_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds = []

    async def drain(self, timeout: float) -> None:
        """The process exited: move on what it wrote before its exit is reported.

        Its pipes hold everything it wrote by now. A pty may still be held by a process it left
        behind, so there we also wait a moment for bytes in flight; then the terminal's output ends,
        as the Go shim shuts the console down at exit, so the client reading stdout sees EOF.
        Last, while the client is reading our FIFOs, we wait until it has read them empty: a client
        may stop reading as soon as it learns of the exit (containerd 1.6's Task.Delete closes its
        FIFOs before waiting for its copy), and what was still in a FIFO would be lost.

        ``timeout`` bounds all of it: the exit is reported after it whatever the client does (an exec's
        exit must still come before its init's, which waits for it only so long).
        """
        self._exited = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def remaining() -> float:
            return max(0.0, deadline - loop.time())

        if self._stderr is not None:
            await self._stderr.drain(remaining())
        if self._output is not None:
            await self._output.drain(remaining(), settle=TTY_SETTLE)
            self._output.close()
        await fifo.read_by_client(list(self._keep.values()), stall=FIFO_STALL, cap=min(FIFO_CAP, remaining()))

    def close_stdin(self) -> None:
        """End the process's input once the stdin FIFO's current content is relayed (CloseIO).

        Without a terminal the process then reads EOF. With one, the terminal is hung up: the Go
        shim closes the pty master when its stdin copy ends (platform.go, CopyConsole), so the
        session gets SIGHUP and reads on the terminal fail. After the exit it only stops relaying.
        """
        self._stdin_closed = True
        if self._stdin is None or not self._stdin.started:
            return  # no stdin, or not started yet: start() applies it
        if self._exited:
            self._stdin.close()
        else:
            self._stdin.end_when_empty()

    def _hang_up(self) -> None:
        """The stdin relay ended (CloseIO): hang the terminal up once the process read its input."""
        if self._exited or self.master is None or self._hanging_up is not None:
            return
        self._hanging_up = asyncio.get_running_loop().create_task(self._hang_up_when_read())

    async def _hang_up_when_read(self) -> None:
        # A hangup flushes the terminal's unread input: give the process a moment to read it first.
        assert self.master is not None
        await input_consumed(self.master, HANGUP_GRACE)
        if self._exited or self.master is None:
            return
        log.debug("%s: input ended: hanging up its terminal", self.name)
        if self._output is not None:
            self._output.pump_now()  # what the master holds now; later output cannot be written
            self._output.close()
        self._close_master()

    def resize(self, width: int, height: int) -> None:
        if not self.terminal:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"process {self.name} has no terminal")
        if self._exited and not self.is_init:  # Go: an exec refuses, an init's console still takes it
            raise TTRPCError(Code.UNKNOWN, "cannot resize a stopped container")
        if self.master is None:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"the terminal of {self.name} is closed")
        set_window_size(self.master, width, height)

    # -- closing -------------------------------------------------------------------------------
    def _close_master(self) -> None:
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None

    def close(self) -> None:
        """Release everything; a logger is stopped in the background (see :meth:`aclose`)."""
        if self.closed:
            return
        self.closed = True
        self._close()
        if self._logger is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing was ever started
                _background(self._logger.stop())

    async def aclose(self) -> None:
        """:meth:`close`, and wait for a logger to exit, as the Go shim's Delete does."""
        self.close()
        if self._logger is not None:
            await self._logger.stop()

    def _close(self) -> None:
        self.release_child_ends()
        if self._hanging_up is not None:
            self._hanging_up.cancel()
        self._stop_receiving()
        for relay in (self._stdin, self._stderr, self._output):
            if relay is not None:
                relay.close()
        for fd in (self._stdin_src, self._sink, *self._keep.values()):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._stdin_src = self._sink = None
        self._keep = {}
        self._close_master()
        if self._logger is not None:
            self._logger.release()


_tasks: set[asyncio.Task[None]] = set()


def _background(task: asyncio.Task[None]) -> None:
    _tasks.add(task)  # referenced until done: the loop keeps only weak references to tasks
    task.add_done_callback(_tasks.discard)
