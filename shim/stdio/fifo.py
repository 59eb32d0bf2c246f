"""Stdio over containerd's FIFOs, without copying output through the shim.

stdout and stderr: the container gets a write end of containerd's FIFO itself, so its bytes go
straight to the reader in containerd (no relay, no copy, nothing to flush at exit: a byte written is
already in the kernel's pipe buffer). The shim keeps a read end open that it never reads from, so a
container writing while containerd restarts blocks when the FIFO is full instead of dying of SIGPIPE
— what the Go shim's relay does too. stdin: relayed FIFO → pipe by the shim, because CloseIO must be
able to give the container EOF while the client still holds its end of the FIFO open.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os

from shim.process import Stdio

log = logging.getLogger("pyrunc.stdio")

_CHUNK = 1 << 16


def _open_output(path: str, keep: list[int]) -> int:
    if not path:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    keep.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    # A reader (ours) exists now, so this open returns at once even on a FIFO.
    return os.open(path, os.O_WRONLY | os.O_CLOEXEC)


class ProcessIO:
    """The fds a process is created with (``child_fds``) and what the shim holds for it meanwhile."""

    def __init__(self) -> None:
        self.child_fds: list[int] = []  # stdin, stdout, stderr for runc create/exec
        self._keep: list[int] = []
        self._stdin: _StdinRelay | None = None

    @classmethod
    def open(cls, stdio: Stdio) -> ProcessIO:
        if stdio.terminal:
            from shim.ttrpc import Code, TTRPCError

            raise TTRPCError(Code.UNIMPLEMENTED, "terminal processes are not supported by pyrunc yet")
        pio = cls()
        try:
            if stdio.stdin:
                fifo = os.open(stdio.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                r, w = os.pipe2(os.O_CLOEXEC)
                pio.child_fds.append(r)
                pio._stdin = _StdinRelay(fifo, w)
            else:
                pio.child_fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            out = _open_output(stdio.stdout, pio._keep)
            pio.child_fds.append(out)
            if stdio.stderr and stdio.stderr == stdio.stdout:
                pio.child_fds.append(out)
            else:
                pio.child_fds.append(_open_output(stdio.stderr, pio._keep))
        except BaseException:
            pio.close()
            raise
        return pio

    def start_relays(self) -> None:
        if self._stdin is not None:
            self._stdin.start()

    def release_child_ends(self) -> None:
        """After runc has handed them to the process: holding them would keep readers from EOF."""
        for fd in set(self.child_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds = []

    def close_stdin(self) -> None:
        if self._stdin is not None:
            self._stdin.close()

    def close(self) -> None:
        self.release_child_ends()
        self.close_stdin()
        for fd in self._keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._keep = []


class _StdinRelay:
    """Copies containerd's stdin FIFO into the process's stdin pipe, on the event loop."""

    def __init__(self, fifo: int, pipe_w: int) -> None:
        self.fifo, self.pipe_w = fifo, pipe_w
        self.pending = b""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def start(self) -> None:
        os.set_blocking(self.pipe_w, False)
        self.loop = asyncio.get_running_loop()
        # Linux reports HUP on a FIFO only once a writer has come and gone, so an empty read here is
        # a real EOF, never "the client has not opened its end yet".
        self.loop.add_reader(self.fifo, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fifo, _CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("stdin relay: read: %s", e)
            data = b""
        if not data:
            self.close()
            return
        self.pending = data
        self._writable()

    def _writable(self) -> None:
        assert self.loop is not None
        try:
            n = os.write(self.pipe_w, self.pending)
        except BlockingIOError:
            n = 0
        except OSError as e:
            if e.errno != errno.EPIPE:
                log.warning("stdin relay: write: %s", e)
            self.close()
            return
        self.pending = self.pending[n:]
        if self.pending:  # the process is not reading: stop reading the FIFO until it does
            self.loop.remove_reader(self.fifo)
            self.loop.add_writer(self.pipe_w, self._writable)
        else:
            self.loop.remove_writer(self.pipe_w)
            self.loop.add_reader(self.fifo, self._readable)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.loop is not None:
            self.loop.remove_reader(self.fifo)
            self.loop.remove_writer(self.pipe_w)
        for fd in (self.fifo, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)
