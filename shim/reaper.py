"""The subreaper: the only place in the shim process that waits for children.

Container processes are reparented to the shim (PR_SET_CHILD_SUBREAPER), and runc invocations are our
children too. Every exit is collected here, on the event loop, by draining ``waitpid(-1, WNOHANG)`` on
SIGCHLD. A second waiter anywhere else (``Popen.wait``, asyncio subprocesses, ``os.waitpid(pid)``) would
steal exit statuses, so nothing else may wait.

Exits nobody is waiting for yet are kept, because a container's init can exit before its pid is known
(we only learn it from runc's pid file after ``runc create`` returned).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = ["Child", "Reaper", "exit_status", "set_child_subreaper"]

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

ExitCallback = Callable[[int, int], None]


def set_child_subreaper(enable: bool = True) -> None:
    """Make orphaned descendants of this process our children instead of init's."""
    import ctypes  # only the long-running server needs it; keep it off the start/delete import path

    from shim.mount import libc

    if libc().prctl(PR_SET_CHILD_SUBREAPER, int(enable), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def exit_status(wait_status: int) -> int:
    """The shim's convention (same as the Go shim): the exit code, or 128+signal when killed."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    # Stopped/continued are not reported without WUNTRACED/WCONTINUED; keep a defined value anyway.
    return 255


class Child:
    """A process started by :meth:`Reaper.spawn`.

    ``stdin``/``stdout``/``stderr`` are our ends of the pipes asked for with ``PIPE`` (raw, blocking,
    close-on-exec fds owned by the caller), else None.
    """

    def __init__(self, pid: int, exited: asyncio.Future[int], stdin: int | None, stdout: int | None,
                 stderr: int | None, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._exited = exited
        # Only set on the cwd fallback path: referenced until reaped so Popen.__del__ never sees a
        # running child and queues it for subprocess._cleanup(), which would waitpid() it behind our back.
        self._popen = popen

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (exit code, or 128+signal), else None."""
        if self._exited.done() and not self._exited.cancelled():
            return self._exited.result()
        return None

    async def wait(self) -> int:
        """Wait for the exit; cancelling the caller does not cancel the status for other waiters."""
        return await asyncio.shield(self._exited)

    def __repr__(self) -> str:
        return f"<Child pid={self.pid} returncode={self.returncode}>"


class Reaper:
    """Collects every child exit of this process and hands it to whoever waits for that pid.

    Use one per process, on the loop that runs the shim. Every method must be called on that loop's
    thread: ``spawn`` relies on the SIGCHLD handler not running until it has registered the child.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *, max_kept: int = 4096,
                 keep_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._max_kept = max_kept
        self._keep_seconds = keep_seconds
        self._clock = clock
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        # pid -> (status, reaped at); insertion order is reap order, which pruning relies on.
        self._kept: dict[int, tuple[int, float]] = {}
        self._subscribers: list[ExitCallback] = []
        self._installed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def install(self) -> None:
        """Handle SIGCHLD on the loop, and collect exits that happened before we were installed."""
        if self._installed:
            return
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._installed = True
        self.reap()

    def close(self) -> None:
        """Stop handling SIGCHLD (after a last drain) and cancel waiters that can no longer resolve."""
        if self._installed:
            self.reap()
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._installed = False
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for fut in futures:
                fut.cancel()

    # -- reaping -----------------------------------------------------------------------------------

    def reap(self) -> None:
        """Drain every exited child. Runs on SIGCHLD; signals coalesce, so one may stand for many exits."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self._deliver(pid, exit_status(wait_status))

    def _deliver(self, pid: int, status: int) -> None:
        for callback in list(self._subscribers):
            try:
                callback(pid, status)
            except Exception:
                # One broken subscriber must not stop exits from reaching the others or the waiters.
                log.exception("reaper subscriber %r failed for pid %d", callback, pid)
        claimed = False
        for fut in self._waiters.pop(pid, ()):
            if not fut.done():
                fut.set_result(status)
                claimed = True
        if not claimed:
            self._keep(pid, status)

    def _keep(self, pid: int, status: int) -> None:
        now = self._clock()
        self._kept.pop(pid, None)  # re-insert so the dict stays in reap order
        self._kept[pid] = (status, now)
        if len(self._kept) > self._max_kept:
            # Oldest first; drop every exit past the horizon at once so this does not run on each reap.
            horizon = now - self._keep_seconds
            while self._kept:
                oldest = next(iter(self._kept))
                if self._kept[oldest][1] > horizon:
                    break
                del self._kept[oldest]

    # -- waiting -----------------------------------------------------------------------------------

    def wait_for(self, pid: int) -> asyncio.Future[int]:
        """A future for the exit status of ``pid``, a child of ours we did not necessarily spawn.

        Resolves at once if the exit was already reaped and not claimed. Each call gets its own future,
        so several waiters all get the status and cancelling one does not affect the others.
        Only unclaimed exits are kept: call this before the exit of a pid someone else already waits
        for (a spawned :class:`Child`, say) is reaped, or it will not resolve.
        """
        fut: asyncio.Future[int] = self._loop.create_future()
        kept = self._kept.pop(pid, None)
        if kept is not None and not self._is_child(pid):
            fut.set_result(kept[0])
            return fut
        # No kept exit, or a stale one: the pid now belongs to another live (or unreaped) child of
        # ours, so the kept status was that of an earlier process with a recycled pid.
        self._add_waiter(pid, fut)
        return fut

    async def wait(self, pid: int) -> int:
        """Await the exit status of ``pid`` (see :meth:`wait_for`)."""
        return await self.wait_for(pid)

    @staticmethod
    def _is_child(pid: int) -> bool:
        # WNOWAIT peeks without reaping: a running child returns None, an unreaped zombie its info.
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return True

    def _add_waiter(self, pid: int, fut: asyncio.Future[int]) -> None:
        self._waiters.setdefault(pid, []).append(fut)
        fut.add_done_callback(lambda f: self._forget(pid, f))

    def _forget(self, pid: int, fut: asyncio.Future[int]) -> None:
        # Drop cancelled waiters (timeouts) so they neither leak nor count as claiming the exit.
        if not fut.cancelled():
            return
        futures = self._waiters.get(pid)
        if futures is not None and fut in futures:
            futures.remove(fut)
            if not futures:
                del self._waiters[pid]

    # -- subscribers -------------------------------------------------------------------------------

    def subscribe(self, callback: ExitCallback) -> None:
        """Call ``callback(pid, status)`` for every reaped exit, in reap order, before any waiter runs."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback: ExitCallback) -> None:
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    # -- spawning ----------------------------------------------------------------------------------

    def spawn(self, argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None, cwd: str | None = None, env: Mapping[str, str] | None = None,
              pass_fds: Iterable[int] = (), start_new_session: bool = False) -> Child:
        """Start ``argv`` as a child whose exit is delivered to the returned :class:`Child`.

        stdin/stdout/stderr: None inherits ours, an fd (int >= 0) is used as is, ``subprocess.DEVNULL``
        opens /dev/null, ``subprocess.PIPE`` makes a pipe (our end is on the Child), and for stderr
        ``subprocess.STDOUT`` shares stdout. ``argv[0]`` without a slash is searched on PATH.
        Raises OSError (e.g. FileNotFoundError) when the program cannot be executed.
        """
        if not argv:
            raise ValueError("empty argv")
        pass_fds = tuple(pass_fds)
        if any(fd < 3 for fd in pass_fds):
            raise ValueError("pass_fds are for fds >= 3; use stdin/stdout/stderr for 0..2")
        stdio = _Stdio(stdin, stdout, stderr)
        popen: subprocess.Popen[bytes] | None = None
        try:
            if cwd is None:
                pid = _posix_spawn(argv, stdio.sources, env, pass_fds, start_new_session)
            else:
                popen = _popen_spawn(argv, stdio.sources, cwd, env, pass_fds, start_new_session)
                pid = popen.pid
        except BaseException:
            stdio.close_ours()
            raise
        finally:
            stdio.close_childs()
        # Registered before we return to the loop, and the SIGCHLD handler only runs on the loop, so
        # this exit cannot be missed. A kept status for this pid belongs to a dead namesake: drop it.
        self._kept.pop(pid, None)
        exited: asyncio.Future[int] = self._loop.create_future()
        self._add_waiter(pid, exited)
        child = Child(pid, exited, *stdio.ours, popen=popen)
        if popen is not None:
            exited.add_done_callback(lambda f: _settle_popen(child, f))
        return child


# Python ignores SIGPIPE (and the shim may ignore more); ignored dispositions survive exec, so give the
# child the defaults back, as subprocess's restore_signals does.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def _posix_spawn(argv: Sequence[str], sources: list[int | None], env: Mapping[str, str] | None,
                 pass_fds: tuple[int, ...], start_new_session: bool) -> int:
    actions: list[tuple[int, int, int]] = []
    for target, fd in enumerate(sources):
        if fd is not None:
            actions.append((os.POSIX_SPAWN_DUP2, 1 if fd == STDOUT else fd, target))
    for fd in pass_fds:
        # dup2 of an fd onto itself clears FD_CLOEXEC in the child (glibc >= 2.29), so it is inherited.
        actions.append((os.POSIX_SPAWN_DUP2, fd, fd))
    spawn = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
    return spawn(argv[0], argv, os.environ if env is None else env, file_actions=actions,
                 setsid=start_new_session, setsigmask=(), setsigdef=_RESET_SIGNALS)


def _popen_spawn(argv: Sequence[str], sources: list[int | None], cwd: str,
                 env: Mapping[str, str] | None, pass_fds: tuple[int, ...],
                 start_new_session: bool) -> subprocess.Popen[bytes]:
    # os.posix_spawn has no chdir action, so a cwd takes Popen; the Child keeps it (see Child._popen).
    return subprocess.Popen(argv, stdin=sources[0], stdout=sources[1], stderr=sources[2], cwd=cwd,
                            env=env, pass_fds=pass_fds, start_new_session=start_new_session)


def _settle_popen(child: Child, fut: asyncio.Future[int]) -> None:
    # Give Popen a returncode so neither its __del__ nor subprocess._cleanup() ever polls the pid.
    popen, child._popen = child._popen, None
    if popen is not None:
        popen.returncode = -1 if fut.cancelled() else fut.result()


class _Stdio:
    """Resolves stdin/stdout/stderr specs into the fds to dup onto 0/1/2, and owns what it opened."""

    def __init__(self, stdin: int | None, stdout: int | None, stderr: int | None) -> None:
        self.ours: list[int | None] = [None, None, None]
        self._childs: list[int] = []
        self._devnull: int | None = None
        try:
            self.sources = [self._source(0, stdin), self._source(1, stdout), self._source(2, stderr)]
            self._move_low_sources()
        except BaseException:
            self.close_childs()
            self.close_ours()
            raise

    def _source(self, target: int, spec: int | None) -> int | None:
        if spec is None:
            return None
        if spec == PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            ours, theirs = (w, r) if target == 0 else (r, w)
            self.ours[target] = ours
            self._childs.append(theirs)
            return theirs
        if spec == DEVNULL:
            if self._devnull is None:
                self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                self._childs.append(self._devnull)
            return self._devnull
        if spec == STDOUT and target == 2:
            return STDOUT
        if spec < 0:
            raise ValueError(f"unsupported value {spec} for fd {target}")
        return spec

    def _move_low_sources(self) -> None:
        # The child dups onto 0, 1, 2 in order; a source that is itself 0..2 but meant for another
        # target (say stdout=0) would be overwritten first, so give it a number above 2.
        for target, fd in enumerate(self.sources):
            if fd is not None and 0 <= fd <= 2 and fd != target:
                moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                self._childs.append(moved)
                self.sources[target] = moved

    def close_childs(self) -> None:
        for fd in self._childs:
            os.close(fd)
        self._childs = []

    def close_ours(self) -> None:
        for fd in self.ours:
            if fd is not None:
                os.close(fd)
        self.ours = [None, None, None]
