"""OOM watchers: v2 (inotify on memory.events) on a fake file; v1 (eventfd) for real on this host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from shim.cgroups import CgroupError, CgroupV1, CgroupV2, Mode, OOMWatcher, find, mode

EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill 0\n"
# Waits to be moved into its cgroup (a byte on stdin), then touches 200 MB, 1 MB at a time.
HOG = "import sys\nsys.stdin.read(1)\nheld = []\nfor _ in range(200):\n    held.append(b'x' * (1 << 20))\n"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(test(), 60)
    asyncio.run(main())


async def settle(seconds: float = 0.3) -> None:
    """Give the loop time to dispatch whatever the kernel has queued (inotify notifies within ~10 ms)."""
    await asyncio.sleep(seconds)


def write_events(path: Path, *, kill: int, oom: int | None = None, max: int = 0) -> None:
    path.write_text(EVENTS.format(max=max, oom=kill if oom is None else oom, kill=kill))


# -- v2 -----------------------------------------------------------------------------------------------

def test_v2_calls_back_when_oom_kill_increases_and_only_then(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    write_events(events, kill=0)
    calls: list[str] = []

    async def test() -> None:
        before = open_fds()
        watcher = OOMWatcher()
        watcher.add("c1", CgroupV2(str(tmp_path)), calls.append)
        assert open_fds() == before + 1
        write_events(events, kill=1, max=3)
        await settle()
        assert calls == ["c1"]
        write_events(events, kill=1, max=9)  # other counters move: no OOM kill
        await settle()
        assert calls == ["c1"]
        write_events(events, kill=3, max=12)  # two more kills seen at once: one event, as in Go
        await settle()
        assert calls == ["c1", "c1"]
        watcher.remove("c1")
        watcher.remove("c1")  # twice is fine
        assert open_fds() == before
        write_events(events, kill=4)
        await settle()
        assert calls == ["c1", "c1"]

    run(test)


def test_v2_counts_kills_from_zero_so_one_before_add_is_not_lost(tmp_path: Path) -> None:
    # As Go's pkg/oom/v2: a container's cgroup starts at zero, so a count found at add time is a kill
    # that raced the watch (e.g. right after runc start); add looks once on the next loop iteration.
    events = tmp_path / "memory.events"
    write_events(events, kill=1)
    calls: list[str] = []

    async def test() -> None:
        watcher = OOMWatcher()
        watcher.add("c1", CgroupV2(str(tmp_path)), calls.append)
        assert calls == []  # never from inside add: the caller publishes TaskStart first
        await asyncio.sleep(0)
        assert calls == ["c1"] and watcher.flush("c1") is False
        write_events(events, kill=1, max=1)
        await settle()
        assert calls == ["c1"]
        write_events(events, kill=2, max=1)
        await settle()
        assert calls == ["c1", "c1"]
        watcher.close()

    run(test)


def test_v2_flush_delivers_synchronously_and_only_once(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    write_events(events, kill=0)
    calls: list[str] = []

    async def test() -> None:
        watcher = OOMWatcher()
        watcher.add("c1", CgroupV2(str(tmp_path)), calls.append)
        assert watcher.flush("c1") is False
        write_events(events, kill=1)
        # no await in between: the loop has not dispatched the inotify event yet
        assert watcher.flush("c1") is True and calls == ["c1"]
        await settle()
        assert calls == ["c1"]
        assert watcher.flush("unknown") is False
        watcher.close()

    run(test)


def test_v2_stops_watching_when_the_file_goes_away(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    write_events(events, kill=0)
    calls: list[str] = []

    async def test() -> None:
        before = open_fds()
        watcher = OOMWatcher()
        watcher.add("c1", CgroupV2(str(tmp_path)), calls.append)
        events.unlink()  # inotify reports IN_IGNORED: the watch is gone
        await settle()
        assert "c1" not in watcher and calls == [] and open_fds() == before

    run(test)


def test_a_failing_callback_does_not_stop_the_watch(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    write_events(events, kill=0)
    calls: list[str] = []

    def on_oom(container_id: str) -> None:
        calls.append(container_id)
        raise RuntimeError("publisher broke")

    async def test() -> None:
        watcher = OOMWatcher()
        watcher.add("c1", CgroupV2(str(tmp_path)), on_oom)
        write_events(events, kill=1)
        await settle()
        write_events(events, kill=2)
        await settle()
        assert calls == ["c1", "c1"] and "c1" in watcher
        watcher.close()
        assert "c1" not in watcher

    run(test)


def test_add_refuses_what_it_cannot_watch(tmp_path: Path) -> None:
    async def test() -> None:
        before = open_fds()
        watcher = OOMWatcher()
        with pytest.raises(CgroupError):
            watcher.add("c1", CgroupV1(str(tmp_path), {"pids": "/"}), print)
        with pytest.raises(OSError):
            watcher.add("c2", CgroupV2(str(tmp_path / "missing")), print)
        with pytest.raises(OSError):
            watcher.add("c3", CgroupV1(str(tmp_path), {"memory": "/"}), print)  # no cgroup.event_control
        assert "c1" not in watcher and "c2" not in watcher and "c3" not in watcher
        assert open_fds() == before

    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    run(test)


# -- v1, for real ---------------------------------------------------------------------------------------

@pytest.fixture
def memory_cgroup() -> Iterator[str]:
    """/sys/fs/cgroup/memory/pyrunc-test-<random> with a 32 MiB limit; removed afterwards."""
    if mode() not in (Mode.LEGACY, Mode.HYBRID):
        pytest.skip(f"this host's cgroups are {mode().value}: no v1 memory controller")
    base = "/sys/fs/cgroup/memory"
    if not os.path.isfile(os.path.join(base, "cgroup.event_control")):
        pytest.skip("no v1 memory hierarchy at /sys/fs/cgroup/memory")
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    path = os.path.join(base, f"pyrunc-test-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup: {e}")
    try:
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(32 << 20))
        yield path
    finally:
        remove_cgroup(path)


def remove_cgroup(path: str) -> None:
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)  # a killed process can take a moment to leave


@contextlib.contextmanager
def hog_in(cgroup_dir: str) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE)
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(child.pid))
        assert child.stdin is not None
        child.stdin.write(b"go")
        child.stdin.close()
        yield child
    finally:
        child.kill()
        child.wait()


def test_v1_real_oom_kill_is_reported(memory_cgroup: str) -> None:
    calls: list[str] = []

    async def test() -> None:
        before = open_fds()
        watcher = OOMWatcher()
        oom = asyncio.Event()

        def on_oom(container_id: str) -> None:
            calls.append(container_id)
            oom.set()

        with hog_in(memory_cgroup) as child:
            cg = find(child.pid)
            assert isinstance(cg, CgroupV1) and cg.dir("memory") == memory_cgroup
            watcher.add("hog", cg, on_oom)
            await asyncio.wait_for(oom.wait(), 30)
            while child.poll() is None:
                await asyncio.sleep(0.02)
            assert child.returncode == -9  # the OOM killer's SIGKILL
        assert watcher.flush("hog") is False  # at the exit: that OOM was reported already, once
        await settle(0.1)
        assert calls == ["hog"]
        watcher.remove("hog")
        remove_cgroup(memory_cgroup)
        assert open_fds() == before

    run(test)


def test_v1_flush_at_exit_sees_the_oom_before_the_loop_does(memory_cgroup: str) -> None:
    """The guarantee the service relies on: when the victim's exit is handled, the OOM is already visible."""
    calls: list[str] = []

    async def test() -> None:
        watcher = OOMWatcher()
        with hog_in(memory_cgroup) as child:
            watcher.add("hog", find(child.pid), calls.append)
            child.wait()  # blocks the loop on purpose: the eventfd cannot be dispatched meanwhile
            assert child.returncode == -9
            assert watcher.flush("hog") is True and calls == ["hog"]
        await settle(0.1)
        assert calls == ["hog"]
        watcher.close()

    run(test)


def test_v1_a_kill_before_the_watch_was_added_is_reported_by_flush(memory_cgroup: str) -> None:
    calls: list[str] = []

    async def test() -> None:
        with hog_in(memory_cgroup) as child:
            cg = find(child.pid)
            child.wait()
            assert child.returncode == -9
        watcher = OOMWatcher()
        watcher.add("hog", cg, calls.append)
        # the eventfd saw nothing (registered after the OOM): the oom_kill counter found at add time is
        # reported once, by flush or by add's own look on the next loop iteration, whichever is first
        assert watcher.flush("hog") is True and watcher.flush("hog") is False
        await settle(0.1)
        assert calls == ["hog"]
        watcher.close()

    run(test)


def test_v1_removing_the_cgroup_is_not_an_oom(memory_cgroup: str) -> None:
    # The kernel signals the eventfd when the cgroup is removed; the watcher must notice the cgroup is
    # gone, call nothing, and drop the watch (closing its fd), as containerd's pkg/oom/v1 does.
    calls: list[str] = []

    async def test() -> None:
        before = open_fds()
        watcher = OOMWatcher()
        watcher.add("idle", CgroupV1(os.path.dirname(os.path.dirname(memory_cgroup)),
                                     {"memory": "/" + os.path.basename(memory_cgroup)}), calls.append)
        assert open_fds() == before + 1
        os.rmdir(memory_cgroup)
        for _ in range(100):
            if "idle" not in watcher:
                break
            await asyncio.sleep(0.02)
        assert "idle" not in watcher and calls == []
        assert open_fds() == before

    run(test)
