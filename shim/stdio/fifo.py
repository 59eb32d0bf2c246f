"""Stdio over containerd's FIFOs, without copying output through the shim.

stdout: the container gets a write end of containerd's FIFO itself, so its bytes go straight to the
reader in containerd (no relay, no copy, nothing to flush at exit: a byte written is already in the
kernel's pipe buffer). The shim keeps a read end open that it never reads from, so a container writing
while containerd restarts blocks when the FIFO is full instead of dying of SIGPIPE — what the Go shim's
relay does too.

stderr: a pipe spliced into the FIFO by the shim (in-kernel, no copy through Python). Not passed
directly because runc itself prints its failure on its stderr, which the process inherits; the Go shim
never shows that text to the client (it starts copying only once runc succeeded), and neither do we.
At exit the relay is drained before the exit is reported.

stdin: relayed FIFO → pipe by the shim, because CloseIO must be able to give the container EOF while
the client still holds its end of the FIFO open. The FIFO is opened read-write, so a client that goes
away (containerd restarting) is not an EOF: only CloseIO ends the process's input, as with the Go shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import termios

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
        self._stderr: _OutputRelay | None = None

    @classmethod
    def open(cls, stdio: Stdio) -> ProcessIO:
        if stdio.terminal:
            from shim.ttrpc import Code, TTRPCError

            raise TTRPCError(Code.UNIMPLEMENTED, "terminal processes are not supported by pyrunc yet")
        pio = cls()
        try:
            if stdio.stdin:
                fifo = os.open(stdio.stdin, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                r, w = os.pipe2(os.O_CLOEXEC)
                pio.child_fds.append(r)
                pio._stdin = _StdinRelay(fifo, w)
            else:
                pio.child_fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            out = _open_output(stdio.stdout, pio._keep)
            pio.child_fds.append(out)
            if not stdio.stderr:
                pio.child_fds.append(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
            else:
                fifo_w = out if stdio.stderr == stdio.stdout else _open_output(stdio.stderr, pio._keep)
                r, w = os.pipe2(os.O_CLOEXEC)
                pio.child_fds.append(w)
                pio._stderr = _OutputRelay(r, os.dup(fifo_w) if fifo_w == out else fifo_w)
        except BaseException:
            pio.close()
            raise
        return pio

    def start_relays(self) -> None:
        if self._stdin is not None:
            self._stdin.start()
        if self._stderr is not None:
            self._stderr.start()

    async def drain(self, timeout: float) -> None:
        """Everything an exited process wrote is in its pipes: move it on before the exit is told."""
        if self._stderr is not None:
            await self._stderr.drain(timeout)

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
        if self._stderr is not None:
            self._stderr.close()
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
        if self.closed:  # CloseIO came while the process was being started: its stdin is at EOF already
            return
        os.set_blocking(self.pipe_w, False)
        self.loop = asyncio.get_running_loop()
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


class _OutputRelay:
    """Splices a process's output pipe into containerd's FIFO on the event loop, until EOF."""

    def __init__(self, pipe_r: int, fifo_w: int) -> None:
        self.pipe_r, self.fifo_w = pipe_r, fifo_w
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def start(self) -> None:
        os.set_blocking(self.pipe_r, False)
        os.set_blocking(self.fifo_w, False)  # our own open of the FIFO: nobody else shares its flags
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.pipe_r, self._readable)

    def _move(self) -> int | None:
        """Bytes moved; 0 at EOF; None when nothing can move now (pipe empty or FIFO full)."""
        try:
            return os.splice(self.pipe_r, self.fifo_w, 1 << 20, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno != errno.EPIPE:
                log.warning("output relay: %s", e)
            return 0

    def _readable(self) -> None:
        assert self.loop is not None
        n = self._move()
        if n == 0:
            self.close()
        elif n is None and self._pending():  # the FIFO is full: wait until the client reads
            self.loop.remove_reader(self.pipe_r)
            self.loop.add_writer(self.fifo_w, self._writable)

    def _writable(self) -> None:
        assert self.loop is not None
        self.loop.remove_writer(self.fifo_w)
        self.loop.add_reader(self.pipe_r, self._readable)

    def _pending(self) -> int:
        buf = fcntl.ioctl(self.pipe_r, termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]

    async def drain(self, timeout: float) -> None:
        if self.closed or self.loop is None:
            return
        deadline = self.loop.time() + timeout
        while not self.closed and self._pending():
            n = self._move()
            if n == 0:
                self.close()
            elif n is None:
                if self.loop.time() > deadline:
                    log.warning("output relay: client not reading; reporting the exit with output pending")
                    return
                await asyncio.sleep(0.005)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.loop is not None:
            self.loop.remove_reader(self.pipe_r)
            self.loop.remove_writer(self.fifo_w)
        for fd in (self.pipe_r, self.fifo_w):
            with contextlib.suppress(OSError):
                os.close(fd)
