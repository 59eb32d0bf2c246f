"""Reading a child's output pipe on the event loop without ever waiting for EOF."""

from __future__ import annotations

import asyncio
import os

_CHUNK = 65536


class Capture:
    """Collects what a child writes to a pipe, read as it arrives so the child never blocks on a full pipe.

    :meth:`finish` is called once the child has exited: everything it wrote is in the pipe by then, so
    a last non-blocking drain gets it all. EOF is not awaited because a grandchild (a container's init
    forked by ``runc create``) may hold the write end open for ever.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None) -> None:
        self._loop = loop
        self._fd = fd
        self._buf = bytearray()
        if fd is not None:
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._drain)

    def _drain(self) -> None:
        fd = self._fd
        while fd is not None:
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                self._close()
                return
            self._buf += chunk

    def _close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def finish(self) -> bytes:
        """Take the rest of what is buffered in the pipe, close it and return everything read."""
        try:
            self._drain()
        finally:
            self._close()
        return bytes(self._buf)


def data_fd(data: bytes) -> int:
    """An fd positioned at the start of an in-memory file holding ``data``, to serve as a child's stdin.

    Unlike a pipe it needs no writer on the loop, whatever the size of ``data``.
    """
    fd = os.memfd_create("runc-stdin", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
