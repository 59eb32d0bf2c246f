"""``binary://`` log URIs: a logging program fed the process's output, as the Go shim runs it.

The logger gets the read end of a stdout pipe on fd 3, of a stderr pipe on fd 4 and the write end of
a "ready" pipe on fd 5; its environment is only CONTAINER_ID and CONTAINER_NAMESPACE (the process id
— an exec's own id for an exec, as Go passes it — and the namespace); its arguments come from the
URI's query (see :func:`shim.stdio.uri.binary_args`). It says it is ready by writing to fd 5 or
closing it; unlike Go we wait for that at most :data:`READY_TIMEOUT` seconds. It is stopped when the
process's I/O is closed: SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT` seconds, as Go does.

The reaper's ``spawn`` places inherited fds at their own numbers only, so the logger is started
through a tiny trampoline (this Python, isolated, no site) that moves the three fds to 3, 4, 5 and
execs the logger; an exec failure comes back on a close-on-exec pipe, so a missing program is an
error of Create like Go's "fork/exec …: no such file or directory". The pid is the logger's
throughout, spawned by and reaped through the reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from shim.reaper import DEVNULL, Child, Reaper
from shim.stdio.relay import wait_readable

log = logging.getLogger("pyrunc.stdio")

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 12.0  # Go's binaryIOProcTermTimeout

# argv: -c CODE errpipe out err ready path args…  Moves every inherited fd above 5 first, so that
# placing them on 3, 4, 5 never overwrites one not yet placed, then execs; on failure reports
# "errno:message" on the error pipe (close-on-exec, so a successful exec reports nothing).
_TRAMPOLINE = """\
import fcntl, os, sys
a = sys.argv
srcs = [int(x) for x in a[1:5]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in srcs]
for fd in srcs:
    os.close(fd)
for target, fd in zip((3, 4, 5), high[1:]):
    os.dup2(fd, target)
    os.close(fd)
try:
    os.execve(a[5], a[5:], os.environ)
except OSError as e:
    os.write(high[0], b"%d:%s" % (e.errno or 0, (e.strerror or str(e)).encode()))
    os._exit(127)
"""


class LoggerError(Exception):
    """The logger could not be started or did not get ready; the message is for the client."""


class BinaryLogger:
    """A running logger: ``stdout_w``/``stderr_w`` are the write ends of its fd 3 and fd 4 pipes."""

    def __init__(self, child: Child, path: str, stdout_w: int, stderr_w: int) -> None:
        self.child = child
        self.path = path
        self.stdout_w: int | None = stdout_w
        self.stderr_w: int | None = stderr_w
        self._stopping: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, reaper: Reaper, path: str, args: tuple[str, ...], *, process_id: str,
                    namespace: str, ready_timeout: float | None = None) -> BinaryLogger:
        timeout = READY_TIMEOUT if ready_timeout is None else ready_timeout
        mine: list[int] = []  # every fd we opened, closed on failure
        theirs: list[int] = []  # the ends the logger gets, closed by us once it has them
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            exec_r, exec_w = os.pipe2(os.O_CLOEXEC)
            mine += [out_w, err_w, ready_r, exec_r]
            theirs += [exec_w, out_r, err_r, ready_w]
            env = {"CONTAINER_ID": process_id, "CONTAINER_NAMESPACE": namespace}
            argv = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, *map(str, theirs), path, *args]
            try:
                child = reaper.spawn(argv, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL, env=env,
                                     pass_fds=theirs)
            except OSError as e:
                raise LoggerError(f"failed to start binary process: {e}") from e
            for fd in theirs:
                os.close(fd)
            theirs = []
            logger = cls(child, path, out_w, err_w)
            try:
                await asyncio.wait_for(_ready(exec_r, ready_r, path), timeout)
            except TimeoutError:
                logger.kill()
                raise LoggerError(f"logging binary {path} did not signal readiness on fd 5 "
                                  f"within {timeout:g}s") from None
            except BaseException:
                logger.kill()
                raise
            for fd in (exec_r, ready_r):
                os.close(fd)
            return logger
        except BaseException:
            for fd in mine + theirs:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    def release(self) -> None:
        """Close our copies of the write ends once the process (or a relay) holds its own: the
        logger then sees EOF as soon as the process's side is gone, without waiting for us."""
        for name in ("stdout_w", "stderr_w"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)

    def stop(self) -> asyncio.Task[None]:
        """SIGTERM now, SIGKILL after STOP_TIMEOUT unless it exited; returns the task doing it."""
        if self._stopping is None:
            self.release()
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        if self.child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.child.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("logger %s (pid %d) ignored SIGTERM for %gs: killing it", self.path, self.child.pid,
                        STOP_TIMEOUT)
            self.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.child.wait(), 5)

    def kill(self) -> None:
        if self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signal.SIGKILL)


async def _ready(exec_r: int, ready_r: int, path: str) -> None:
    """Wait until the trampoline exec'd the logger (or say why not), then for the logger's readiness."""
    report = await _read_to_eof(exec_r)
    if report:
        code, _, message = report.decode(errors="replace").partition(":")
        # Go's wording (os/exec): "fork/exec PATH: no such file or directory".
        message = message[:1].lower() + message[1:]
        raise LoggerError(f"failed to start binary process: fork/exec {path}: {message}")
    await _read_to_eof(ready_r, limit=1)


async def _read_to_eof(fd: int, limit: int = 4096) -> bytes:
    """Read ``fd`` until EOF or ``limit`` bytes, waiting on the loop."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            await wait_readable(fd)
            continue
        if not chunk:
            break
        data += chunk
    return data
