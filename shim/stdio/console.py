"""Terminals: the console socket runc hands a pty master through, and the master's window size.

For a process with a terminal, runc (``--console-socket PATH``) creates the pty inside the container
and sends the master to PATH as an SCM_RIGHTS message whose data is the pty's name. The socket lives
in a private directory of its own (mode 0700, under $XDG_RUNTIME_DIR when set, as go-runc's
NewTempConsoleSocket does) and both are removed once the master arrived or the process failed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios

from shim import tmp
from shim.stdio.relay import pending_bytes, wait_readable

MAX_NAME = 4096  # runc sends the pty's path as the message's data
_INT = array.array("i")
TIOCGPTPEER = 0x5441  # Linux >= 4.13: open the slave of a pty master; not in Python's termios


class ConsoleSocket:
    """A listening unix socket in a temp dir of its own; :meth:`receive` returns the master fd."""

    def __init__(self) -> None:
        self.dir, _ = tmp.create("pty", "", lambda path: os.mkdir(path, 0o700))  # as go-runc
        self.path = os.path.join(self.dir, "pty.sock")
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
            self._sock.bind(self.path)
            self._sock.listen(1)
        except BaseException:
            self._remove()
            raise

    async def receive(self) -> int:
        """Accept runc's connection and return the pty master it sends (non-blocking, close-on-exec)."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    # MSG_CMSG_CLOEXEC: the fd must not leak into runc or loggers spawned meanwhile.
                    # (socket.recv_fds would drop that flag before Python 3.12.)
                    name, ancdata, flags, _ = conn.recvmsg(MAX_NAME, socket.CMSG_SPACE(_INT.itemsize),
                                                           socket.MSG_CMSG_CLOEXEC)
                    break
                except BlockingIOError:
                    await wait_readable(conn.fileno())
        fds = _rights(ancdata)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise OSError("console socket: control message truncated (more than one fd sent)")
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(f"console socket: expected one fd from runc, got {len(fds)} ({name!r})")
        master = fds[0]
        if not os.isatty(master):
            os.close(master)
            raise OSError("console socket: the fd received is not a terminal")
        os.set_blocking(master, False)
        return master

    def close(self) -> None:
        """Stop listening and remove the socket and its directory."""
        with contextlib.suppress(OSError):
            self._sock.close()
        self._remove()

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def _rights(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


async def input_consumed(master: int, timeout: float) -> None:
    """Wait until the process on the terminal has read the input queued for it, at most ``timeout``.

    The slave's queue is only visible from the slave: TIOCGPTPEER opens it from the master (without
    becoming our controlling terminal) just long enough for FIONREAD. In canonical mode that counts
    complete lines only, which is what a reader can still get. Kernels before 4.13: a short pause.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    empty_seen = 0
    # What was just written to the master reaches the slave's queue from a kernel work item
    # (the tty flip buffer): an empty queue only counts when seen twice, a moment apart.
    while loop.time() < deadline:
        await asyncio.sleep(0.01)
        try:
            peer = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            await asyncio.sleep(min(0.1, timeout))
            return
        try:
            empty_seen = 0 if pending_bytes(peer) else empty_seen + 1
        finally:
            os.close(peer)
        if empty_seen >= 2:
            return


def set_window_size(fd: int, width: int, height: int) -> None:
    """TIOCSWINSZ on a pty master: the kernel sends SIGWINCH to the slave's foreground process group.

    ``width`` is columns and ``height`` rows, as in ResizePtyRequest (values are uint16 in the kernel).
    """
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height & 0xFFFF, width & 0xFFFF, 0, 0))


def window_size(fd: int) -> tuple[int, int]:
    """(width, height) of a terminal."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows
