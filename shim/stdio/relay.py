"""Moving bytes from one fd to another on the event loop, without ever blocking it.

A :class:`Relay` copies ``src`` → ``dst`` with non-blocking fds watched by ``loop.add_reader`` /
``add_writer``. It splices (in-kernel, no copy through Python) while the kernel accepts the pair —
a pipe on either side — and falls back for good to read/write with one buffer of at most
:data:`CHUNK` bytes when it does not (EINVAL: a file opened O_APPEND, an old kernel's tty). Memory is
bounded whatever the producer does: when ``dst`` is full the relay stops reading ``src`` until
``dst`` drains, so the producer blocks in the kernel, as it would writing to a pipe nobody reads.

A regular file as ``dst`` (a ``file://`` log, or a path that is no FIFO) cannot be waited for:
O_NONBLOCK means nothing to it and a write may block on the disk. Its writes go to a thread, one
chunk at a time: ``src`` is not read meanwhile, so order and the one-chunk bound hold as above.

It ends at EOF of ``src`` (a pty master's EIO is its EOF: the last slave fd was closed), when ``dst``
fails (its reader went away), on :meth:`close`, or — after :meth:`end_when_empty` — as soon as
``src`` has nothing more to give, which is how a FIFO opened O_RDWR (never at EOF) is ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import logging
import os
import stat
import struct
import termios
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("pyrunc.stdio")

CHUNK = 1 << 16  # read/write buffer; also what one splice asks for (the pipes' capacity bounds it anyway)
BUDGET = 1 << 22  # bytes moved per loop callback before others get their turn
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
FILE_WRITERS = 4  # threads writing regular files for every relay: a stalled disk holds them, not the loop


class _Step(enum.Enum):
    MOVED = 1
    EOF = 2  # src ended (or dst failed): the relay is done
    SRC_EMPTY = 3
    DST_FULL = 4
    WRITING = 5  # a thread is writing the buffer to the regular file dst


_file_writer: ThreadPoolExecutor | None = None


def _file_writes() -> ThreadPoolExecutor:
    global _file_writer
    if _file_writer is None:  # made on first use: no threads in a process that never writes a file
        _file_writer = ThreadPoolExecutor(FILE_WRITERS, thread_name_prefix="pyrunc-file-write")
    return _file_writer


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _is_file(fd: int) -> bool:
    """Writes to it may block whatever its flags say (a regular file or a block device)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def pending_bytes(fd: int) -> int:
    """Bytes waiting to be read on a pipe, FIFO or tty (FIONREAD is TIOCINQ on ttys)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


async def wait_readable(fd: int) -> None:
    """Return once ``fd`` is readable (or at EOF/error), waiting on the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


class Relay:
    """Copies ``src`` into ``dst`` until it ends; see the module docstring.

    ``close_src``/``close_dst``: whether the relay owns (and closes) each fd when it ends; a pty
    master is shared by the output and input relays and outlives both. ``on_end`` runs once, when the
    relay ends for any reason other than :meth:`close`.
    """

    def __init__(self, src: int, dst: int, *, name: str, close_src: bool = True, close_dst: bool = True,
                 on_end: Callable[[], None] | None = None, splice: bool = True) -> None:
        self.src, self.dst, self.name = src, dst, name
        self._close_src, self._close_dst = close_src, close_dst
        self._on_end = on_end
        self._splice = splice
        self._buf: memoryview | None = None  # read from src, not yet written to dst (read/write mode)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = self._writing = False
        self._to_file = False  # dst is a regular file: written by a thread (see the module docstring)
        self._file_write: asyncio.Future[None] | None = None  # that thread's write in flight
        self._ending = False
        self._drained: asyncio.Future[None] | None = None
        self._settle = 0.0
        self._settle_timer: asyncio.TimerHandle | None = None
        self.moved = 0
        self.closed = False

    @property
    def started(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        if self.closed or self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self.src, False)
        self._to_file = _is_file(self.dst)
        if self._to_file:
            self._splice = False  # a splice into a file blocks on the disk just the same
        else:
            os.set_blocking(self.dst, False)
        self._pump()

    def end_when_empty(self) -> None:
        """Finish once ``src`` has nothing more to read now (what it already holds is still moved)."""
        self._ending = True
        if self._loop is not None and not self.closed:
            self._pump()

    async def drain(self, timeout: float, settle: float = 0.0) -> None:
        """Move what ``src`` holds now, waiting for ``dst`` to take it for at most ``timeout`` seconds.

        ``settle``: once ``src`` looks empty, wait that long for more before returning (a pty's last
        bytes may still be on their way through the line discipline while another process holds it).
        """
        if self.closed or self._loop is None:
            return
        self._drained = self._loop.create_future()
        self._settle = settle
        try:
            self._pump()
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        except TimeoutError:
            log.warning("%s: destination not reading; going on with %d bytes pending", self.name,
                        pending_bytes(self.src) + (len(self._buf) if self._buf is not None else 0))
        finally:
            self._drained = None
            self._cancel_settle()

    def pump_now(self) -> None:
        """Move what can be moved right now (the loop would do it at its next turn)."""
        if self._loop is not None and not self.closed:
            self._pump()

    # -- the pump ----------------------------------------------------------------------------------
    def _pump(self) -> None:
        stop_at = self.moved + BUDGET
        while not self.closed:
            step = self._step()
            if step is _Step.MOVED:
                self._cancel_settle()
                if self.moved >= stop_at:  # let the loop serve others; come back when ready again
                    self._wait(for_dst=self._buf is not None)
                    return
                continue
            if step is _Step.EOF:
                self._end()
            elif step is _Step.DST_FULL:
                self._wait(for_dst=True)
            elif step is _Step.WRITING:  # _written pumps again; a drain waits for this write too
                self._cancel_settle()
                self._unwatch()
            else:  # SRC_EMPTY
                if self._ending:
                    self._end()
                    return
                self._wait(for_dst=False)
                self._src_empty()
            return

    def _step(self) -> _Step:
        if self._buf is not None:
            return self._write()
        if self._splice:
            try:
                n = os.splice(self.src, self.dst, CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # splice says EAGAIN for an empty src and for a full dst alike: ask src which one.
                return _Step.DST_FULL if pending_bytes(self.src) else _Step.SRC_EMPTY
            except OSError as e:
                if e.errno == errno.EINVAL:  # this pair cannot be spliced: copy instead, for good
                    self._splice = False
                    return self._step()
                return self._failed("splice", e)
            if n == 0:
                return _Step.EOF
            self.moved += n
            return _Step.MOVED
        try:
            data = os.read(self.src, CHUNK)
        except BlockingIOError:
            return _Step.SRC_EMPTY
        except OSError as e:
            return self._failed("read", e)
        if not data:
            return _Step.EOF
        self._buf = memoryview(data)
        return self._write()

    def _write(self) -> _Step:
        assert self._buf is not None
        if self._to_file:
            return self._write_in_thread()
        try:
            n = os.write(self.dst, self._buf)
        except BlockingIOError:
            return _Step.DST_FULL
        except OSError as e:
            return self._failed("write", e)
        self.moved += n
        self._buf = self._buf[n:] if n < len(self._buf) else None
        return _Step.MOVED

    def _write_in_thread(self) -> _Step:
        assert self._loop is not None and self._buf is not None
        if self._file_write is None:
            self._file_write = self._loop.run_in_executor(_file_writes(), _write_all, self.dst, self._buf)
            self._file_write.add_done_callback(self._written)
        return _Step.WRITING

    def _written(self, write: asyncio.Future[None]) -> None:
        self._file_write = None
        error = None if write.cancelled() else write.exception()
        if self.closed:
            if self._close_dst:  # close() left dst open for the thread still writing to it
                with contextlib.suppress(OSError):
                    os.close(self.dst)
            return
        if error is not None:
            self._failed("write", error if isinstance(error, OSError) else OSError(str(error)))
            self._end()
            return
        assert self._buf is not None
        self.moved += len(self._buf)
        self._buf = None
        self._pump()

    def _failed(self, op: str, e: OSError) -> _Step:
        # EIO: a pty whose slave side is all closed (src), or hung up (dst). EPIPE: dst's reader is
        # gone (a logger that died). Both are ordinary ends; anything else is worth a warning.
        if e.errno in (errno.EIO, errno.EPIPE):
            log.debug("%s: %s: %s", self.name, op, e)
        else:
            log.warning("%s: %s: %s", self.name, op, e)
        return _Step.EOF

    def _unwatch(self) -> None:
        assert self._loop is not None
        if self._reading:
            self._loop.remove_reader(self.src)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self.dst)
            self._writing = False

    def _wait(self, *, for_dst: bool) -> None:
        assert self._loop is not None
        if for_dst:
            if self._reading:
                self._loop.remove_reader(self.src)
                self._reading = False
            if not self._writing:
                self._loop.add_writer(self.dst, self._pump)
                self._writing = True
        else:
            if self._writing:
                self._loop.remove_writer(self.dst)
                self._writing = False
            if not self._reading:
                self._loop.add_reader(self.src, self._pump)
                self._reading = True

    # -- draining ----------------------------------------------------------------------------------
    def _src_empty(self) -> None:
        if self._drained is None or self._drained.done():
            return
        if not self._settle:
            self._drained.set_result(None)
        elif self._settle_timer is None:
            assert self._loop is not None
            self._settle_timer = self._loop.call_later(self._settle, self._settled)

    def _settled(self) -> None:
        self._settle_timer = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _cancel_settle(self) -> None:
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None

    # -- ending ------------------------------------------------------------------------------------
    def _end(self) -> None:
        on_end, self._on_end = self._on_end, None
        self.close()
        if on_end is not None:
            on_end()

    def close(self) -> None:
        """Stop now; what was read and not yet written is dropped. Idempotent."""
        if self.closed:
            return
        self.closed = True
        log.debug("%s: closed after %d bytes", self.name, self.moved)
        self._cancel_settle()
        if self._loop is not None:
            self._unwatch()
        self._buf = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        # dst waits for a thread still writing to it: the fd's number must not be reused under that write
        for fd, owned in ((self.src, self._close_src), (self.dst, self._close_dst and self._file_write is None)):
            if owned:
                with contextlib.suppress(OSError):
                    os.close(fd)
