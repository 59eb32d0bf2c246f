"""Moving bytes from one fd to another on the event loop, without ever blocking it.

A :class:`Relay` copies ``src`` → ``dst`` with non-blocking fds watched by ``loop.add_reader`` /
``add_writer``. It splices (in-kernel, no copy through Python) while the kernel accepts the pair —
a pipe on either side — and falls back for good to read/write with one buffer of at most
:data:`CHUNK` bytes when it does not (EINVAL: a file opened O_APPEND, an old kernel's tty). Memory is
bounded whatever the producer does: when ``dst`` is full the relay stops reading ``src`` until
``dst`` drains, so the producer blocks in the kernel, as it would writing to a pipe nobody reads.

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
import struct
import termios
from collections.abc import Callable

log = logging.getLogger("pyrunc.stdio")

CHUNK = 1 << 16  # read/write buffer; also what one splice asks for (the pipes' capacity bounds it anyway)
BUDGET = 1 << 22  # bytes moved per loop callback before others get their turn
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class _Step(enum.Enum):
    MOVED = 1
    EOF = 2  # src ended (or dst failed): the relay is done
    SRC_EMPTY = 3
    DST_FULL = 4


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
        try:
            n = os.write(self.dst, self._buf)
        except BlockingIOError:
            return _Step.DST_FULL
        except OSError as e:
            return self._failed("write", e)
        self.moved += n
        self._buf = self._buf[n:] if n < len(self._buf) else None
        return _Step.MOVED

    def _failed(self, op: str, e: OSError) -> _Step:
        # EIO: a pty whose slave side is all closed (src), or hung up (dst). EPIPE: dst's reader is
        # gone (a logger that died). Both are ordinary ends; anything else is worth a warning.
        if e.errno in (errno.EIO, errno.EPIPE):
            log.debug("%s: %s: %s", self.name, op, e)
        else:
            log.warning("%s: %s: %s", self.name, op, e)
        return _Step.EOF

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
            if self._reading:
                self._loop.remove_reader(self.src)
            if self._writing:
                self._loop.remove_writer(self.dst)
        self._reading = self._writing = False
        self._buf = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        for fd, owned in ((self.src, self._close_src), (self.dst, self._close_dst)):
            if owned:
                with contextlib.suppress(OSError):
                    os.close(fd)
