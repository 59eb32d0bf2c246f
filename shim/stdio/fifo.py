"""Opening the destinations a process's stdio is wired to: containerd's FIFOs, plain files, log files.

An output FIFO gets a read end kept open by the shim (never read from): a container writing while
its reader (containerd) restarts then blocks when the FIFO is full instead of dying of SIGPIPE — as
the Go shim's relay does — and our own opens of the write end never block. Every call opens a new
file description, so the O_NONBLOCK a relay sets on its end never leaks into the container's end.

A stdin FIFO is opened read-write: a client that goes away (containerd restarting) is no EOF; only
CloseIO ends a process's input, as with the Go shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import stat

from shim.stdio.relay import pending_bytes

log = logging.getLogger("pyrunc.stdio")

PIPE_SIZE = 1 << 20  # kernel buffer of the pipes we make or get: fewer wake-ups per byte on both sides


class OpenError(Exception):
    """Opening a destination failed; worded like Go's PathError ("open /x: permission denied")."""

    def __init__(self, op: str, e: OSError) -> None:
        message = e.strerror or str(e)
        super().__init__(f"{op} {e.filename}: {message[:1].lower()}{message[1:]}")
        self.errno = e.errno


def open_output(path: str, keep: dict[str, int]) -> int:
    """A write end on ``path``: a FIFO (its keeper read end stored once in ``keep``), else an existing
    file opened for appending, as Go's copyPipes does for a non-FIFO path.

    Every open is non-blocking and what was opened is asked what it is (a path checked first and
    opened after could meanwhile have become a FIFO nobody reads, whose open would block the loop).
    The end returned is blocking again: it is the process's stdout or our relay's to set up.
    """
    mine: list[int] = []  # opened here: closed again unless returned or kept

    def nonblocking(flags: int) -> int:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
        mine.append(fd)
        return fd

    try:
        keeper = keep.get(path)
        try:
            fd = nonblocking(os.O_WRONLY)
        except OSError as e:
            if e.errno != errno.ENXIO or keeper is not None:
                raise
            # A FIFO nobody reads yet: with our keeper read end open, its write end opens at once.
            keeper = nonblocking(os.O_RDONLY)
            fd = nonblocking(os.O_WRONLY)
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)  # and no O_NONBLOCK
            mine.remove(fd)
            return fd
        if keeper is None:
            keeper = nonblocking(os.O_RDONLY)
        kept = os.fstat(keeper)
        if (kept.st_dev, kept.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(errno.EAGAIN, "replaced by another file while being opened", path)
        os.set_blocking(fd, True)
        if path not in keep:
            with contextlib.suppress(OSError):  # only fewer wake-ups for both ends; the default works
                fcntl.fcntl(keeper, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            keep[path] = keeper
        mine = [x for x in mine if x not in (fd, keeper)]
        return fd
    except OSError as e:
        raise OpenError("open", e) from e
    finally:
        for x in mine:
            with contextlib.suppress(OSError):
                os.close(x)


def open_stdin(path: str) -> int:
    """containerd's stdin FIFO, non-blocking, read-write (see the module docstring)."""
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OpenError("open", e) from e


def open_log_file(path: str) -> int:
    """A ``file://`` destination: parent directories made (0755) and the file appended to (0644),
    as the Go shim does."""
    try:
        os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
    except OSError as e:
        raise OpenError("mkdir", e) from e
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OpenError("open", e) from e


def devnull(write: bool) -> int:
    return os.open(os.devnull, (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC)


async def read_by_client(keepers: list[int], *, stall: float, cap: float) -> None:
    """Wait until the client has read what our output FIFOs hold (seen through our keeper read ends).

    Done when they are empty, or when their content has not reached a new low for ``stall`` seconds
    (nobody reads, or something still writes faster than the client reads), or after ``cap``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cap
    lowest, progress_at = None, loop.time()
    while True:
        pending = sum(pending_bytes(fd) for fd in keepers)
        now = loop.time()
        if not pending:
            return
        if lowest is None or pending < lowest:
            lowest, progress_at = pending, now
        elif now - progress_at >= stall:
            log.debug("%d bytes left unread in the output FIFOs at exit: the client is not reading", pending)
            return
        if now >= deadline:
            log.warning("%d bytes still unread in the output FIFOs %gs after the exit", pending, cap)
            return
        await asyncio.sleep(0.002)
