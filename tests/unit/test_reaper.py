"""The reaper: every exit reaped once, delivered to the right waiter, kept when nobody waits yet."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shim.reaper import Reaper, exit_status, set_child_subreaper

# Forks N children that exit with CODE at once, prints their pids and exits without waiting for
# them: they become zombies reparented to us (the subreaper), i.e. exits of pids we never spawned.
ORPHANS = "import os,sys\nfor _ in range(int(sys.argv[1])):\n    pid = os.fork()\n    if pid == 0:\n" \
          "        os._exit(int(sys.argv[2]))\n    print(pid)\n"


@pytest.fixture(scope="module", autouse=True)
def subreaper():
    set_child_subreaper()
    yield
    # Later tests start containerd and shims; orphans must not become zombies of the test process.
    set_child_subreaper(False)


def run(test: Callable[[Reaper], Awaitable[None]], **kwargs: object) -> None:
    async def main() -> None:
        reaper = Reaper(**kwargs)  # type: ignore[arg-type]
        reaper.install()
        try:
            await asyncio.wait_for(test(reaper), 30)
        finally:
            reaper.close()
        assert_no_children()

    asyncio.run(main())


def children() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids.update(int(pid) for pid in f.read().split())
    return pids


def assert_no_children() -> None:
    assert children() == set()
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


async def read_all(fd: int) -> bytes:
    # Test helper only: the pipes here are short-lived and their writers exit at once.
    chunks = []
    while chunk := await asyncio.to_thread(os.read, fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


async def orphans(reaper: Reaper, count: int, code: int) -> list[int]:
    """Exits of ``count`` processes we did not spawn, reaped (and so kept) before returning."""
    seen: set[int] = set()
    reaper.subscribe(lambda pid, status: seen.add(pid))
    child = reaper.spawn([sys.executable, "-I", "-c", ORPHANS, str(count), str(code)],
                         stdout=subprocess.PIPE)
    pids = [int(line) for line in (await read_all(child.stdout)).split()]
    assert await child.wait() == 0
    while not seen.issuperset(pids):
        await asyncio.sleep(0.01)
    return pids


def test_exit_status_convention() -> None:
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 137


def test_exit_code_and_signal() -> None:
    async def test(reaper: Reaper) -> None:
        assert await reaper.spawn(["sh", "-c", "exit 3"]).wait() == 3
        assert await reaper.spawn(["sh", "-c", "kill -KILL $$"]).wait() == 128 + signal.SIGKILL
        child = reaper.spawn(["sleep", "30"])
        os.kill(child.pid, signal.SIGTERM)
        assert await child.wait() == 128 + signal.SIGTERM
        assert child.returncode == 143

    run(test)


def test_exit_before_pid_is_known_is_kept() -> None:
    async def test(reaper: Reaper) -> None:
        seen: list[tuple[int, int]] = []
        reaper.subscribe(lambda pid, status: seen.append((pid, status)))
        # The grandchild outlives its parent by a moment, then exits: reparented to us, reaped,
        # and claimed only afterwards, as a container init read from runc's pid file would be.
        parent = reaper.spawn(["sh", "-c", "(sleep 0.05; exit 7) >/dev/null & echo $!"],
                              stdout=subprocess.PIPE)
        grandchild = int(await read_all(parent.stdout))
        assert await parent.wait() == 0
        while (grandchild, 7) not in seen:
            await asyncio.sleep(0.01)
        first, second = reaper.wait_for(grandchild), reaper.wait_for(grandchild)
        assert first.done() and first.result() == 7
        assert not second.done()  # claimed once: the kept exit is not handed out twice
        second.cancel()

    run(test)


def test_many_concurrent_children() -> None:
    async def test(reaper: Reaper) -> None:
        kids = [reaper.spawn(["sh", "-c", f"exit {i}"]) for i in range(200)]
        assert len({kid.pid for kid in kids}) == 200
        statuses = await asyncio.gather(*(kid.wait() for kid in kids))
        assert statuses == list(range(200))

    run(test)


def test_several_waiters_and_cancelled_waiter() -> None:
    async def test(reaper: Reaper) -> None:
        child = reaper.spawn(["sh", "-c", "sleep 0.1; exit 5"])
        a, b, c = reaper.wait_for(child.pid), reaper.wait_for(child.pid), reaper.wait_for(child.pid)
        b.cancel()
        impatient = asyncio.ensure_future(child.wait())
        await asyncio.sleep(0)
        impatient.cancel()  # shielded: the status still reaches the other waiters
        assert await asyncio.gather(child.wait(), a, reaper.wait(child.pid), c) == [5, 5, 5, 5]

    run(test)


def test_stale_kept_exit_of_recycled_pid_is_ignored() -> None:
    async def test(reaper: Reaper) -> None:
        child = reaper.spawn(["sh", "-c", "sleep 0.1; exit 4"])
        # As if an earlier process with this pid had exited unclaimed: the pid is a live child of
        # ours now, so that status is not this process's.
        reaper._kept[child.pid] = (99, time.monotonic())
        assert await reaper.wait_for(child.pid) == 4
        assert await child.wait() == 4

    run(test)


def test_subscribers_see_every_exit_in_order() -> None:
    async def test(reaper: Reaper) -> None:
        seen: list[tuple[int, int]] = []

        def broken(pid: int, status: int) -> None:
            raise RuntimeError("must not stop delivery")

        reaper.subscribe(broken)
        reaper.subscribe(lambda pid, status: seen.append((pid, status)))
        first = reaper.spawn(["sh", "-c", "exit 1"])
        await first.wait()
        second = reaper.spawn(["sh", "-c", "exit 2"])
        await second.wait()
        reaper.unsubscribe(broken)
        reaper.unsubscribe(broken)  # unknown callbacks are ignored
        assert seen == [(first.pid, 1), (second.pid, 2)]

    run(test)


def test_install_collects_exits_from_before() -> None:
    async def main() -> None:
        reaper = Reaper()
        child = reaper.spawn(["true"])
        while not os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            time.sleep(0.01)
        reaper.install()
        try:
            assert child.returncode == 0
        finally:
            reaper.close()
        assert_no_children()

    asyncio.run(main())


def test_pruning_bound() -> None:
    now = [0.0]

    async def test(reaper: Reaper) -> None:
        old = await orphans(reaper, 4, 9)
        now[0] = 100.0
        new = await orphans(reaper, 2, 8)  # 6 kept > 5: drop those older than 60 s
        for pid in new:
            fut = reaper.wait_for(pid)
            assert fut.done() and fut.result() == 8
        for pid in old:
            fut = reaper.wait_for(pid)
            assert not fut.done()
            fut.cancel()

    run(test, max_kept=5, keep_seconds=60.0, clock=lambda: now[0])


def test_pruning_keeps_young_exits_beyond_the_bound() -> None:
    async def test(reaper: Reaper) -> None:
        pids = await orphans(reaper, 6, 3)
        assert [reaper.wait_for(pid).result() for pid in pids] == [3] * 6

    run(test, max_kept=2, keep_seconds=60.0)


def test_spawn_stdio_pipes_devnull_stdout_and_env() -> None:
    async def test(reaper: Reaper) -> None:
        child = reaper.spawn(["sh", "-c", 'read line; echo "$line $FOO"; echo err >&2'],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={"FOO": "bar", "PATH": os.environ["PATH"]})
        os.write(child.stdin, b"hello\n")
        os.close(child.stdin)
        assert await read_all(child.stdout) == b"hello bar\nerr\n"
        assert await child.wait() == 0
        quiet = reaper.spawn(["cat"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        assert quiet.stdin is None and quiet.stdout is None
        assert await quiet.wait() == 0

    run(test)


def test_spawn_fds_pass_fds_and_low_fd_sources() -> None:
    async def test(reaper: Reaper) -> None:
        r, w = os.pipe()
        extra_r, extra_w = os.pipe()
        child = reaper.spawn(["sh", "-c", f"echo out; echo extra >/dev/fd/{extra_w}"], stdout=w,
                             pass_fds=[extra_w])
        os.close(w)
        os.close(extra_w)
        assert await child.wait() == 0
        assert await read_all(r) == b"out\n"
        assert await read_all(extra_r) == b"extra\n"
        # stdout given as our fd 0 while stdin is /dev/null: dup'ing /dev/null onto 0 first must not
        # clobber the stdout source.
        r, w = os.pipe()
        saved = os.dup(0)
        os.dup2(w, 0)
        try:
            child = reaper.spawn(["echo", "to-fd-0"], stdin=subprocess.DEVNULL, stdout=0)
        finally:
            os.dup2(saved, 0)
            os.close(saved)
            os.close(w)
        assert await child.wait() == 0
        assert await read_all(r) == b"to-fd-0\n"
        # An fd that is not passed is not inherited.
        r, w = os.pipe()
        child = reaper.spawn(["sh", "-c", f"echo x >/dev/fd/{w}"], stderr=subprocess.DEVNULL)
        os.close(w)
        assert await child.wait() != 0
        assert await read_all(r) == b""

    run(test)


def test_spawn_cwd_and_new_session(tmp_path: Path) -> None:
    async def test(reaper: Reaper) -> None:
        child = reaper.spawn(["sh", "-c", "pwd; ps -o sid= -p $$"], cwd=str(tmp_path),
                             stdout=subprocess.PIPE, start_new_session=True)
        out = (await read_all(child.stdout)).split()
        assert await child.wait() == 0
        assert out[0].decode() == str(tmp_path)
        assert int(out[1]) == child.pid  # a session leader
        await asyncio.sleep(0)  # the exit future's done-callbacks run on the next loop iteration
        popen = child._popen
        assert popen is None  # released once reaped, with its returncode set

        child = reaper.spawn(["sh", "-c", "ps -o sid= -p $$"], stdout=subprocess.PIPE,
                             start_new_session=True)
        assert int(await read_all(child.stdout)) == child.pid
        assert await child.wait() == 0

    run(test)


def test_spawned_child_gets_default_sigpipe() -> None:
    async def test(reaper: Reaper) -> None:
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's own setting
        child = reaper.spawn(["cat", "/proc/self/status"], stdout=subprocess.PIPE)
        status = dict(line.split(":\t", 1) for line in (await read_all(child.stdout)).decode().splitlines())
        assert await child.wait() == 0
        assert not int(status["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1))

    run(test)


def test_spawn_failure_leaves_nothing_behind() -> None:
    async def test(reaper: Reaper) -> None:
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(FileNotFoundError):
            reaper.spawn(["/nonexistent/program"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with pytest.raises(FileNotFoundError):
            reaper.spawn(["no-such-program-on-path"], stdout=subprocess.DEVNULL)
        with pytest.raises(FileNotFoundError):
            reaper.spawn(["/nonexistent/program"], cwd="/")
        assert set(os.listdir("/proc/self/fd")) == before
        with pytest.raises(ValueError):
            reaper.spawn([])

    run(test)


def test_close_cancels_pending_waiters() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        fut = reaper.wait_for(2**22 + 12345)  # nobody's pid
        reaper.close()
        assert fut.cancelled()

    asyncio.run(main())
