"""OOM notifications for containers, event-driven on the shim's asyncio loop (``loop.add_reader``).

- v1: an eventfd registered through ``cgroup.event_control`` on ``memory.oom_control``. The kernel
  signals it when the memcg (or an ancestor) runs out of memory, before the OOM killer sends SIGKILL —
  and also once when the cgroup is removed, which is no OOM: like containerd's pkg/oom/v1 we tell the
  two apart by checking that the cgroup still exists, and stop watching a cgroup that is gone.
- v2: inotify (IN_MODIFY) on ``memory.events``; an OOM is an increase of its ``oom_kill`` counter
  (``oom`` on a kernel without it), as in containerd's pkg/oom/v2.

A kill that happened before ``add`` is not lost: v2 counts kills from zero, as Go's v2 watcher does (a
container's fresh cgroup starts at zero), and v1 reports a non-zero ``oom_kill`` of memory.oom_control
found when the eventfd is registered; ``add`` checks once on the next loop iteration. The kernel notifies
and counts before it sends the SIGKILL ("task reaper must see this", mm/oom_kill.c), so ``flush(id)`` run
when a container's process exit is handled sees every OOM behind that exit: the service calls it
before publishing TaskExit, so TaskOOM always comes first."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shim.cgroups._linux import IN_IGNORED, IN_MODIFY, inotify_drain, inotify_watch
from shim.cgroups._parse import parse_kv, read_text
from shim.cgroups.paths import Cgroup, CgroupError, CgroupV1

log = logging.getLogger("pyrunc.cgroups")

OnOOM = Callable[[str], None]


class _Seen(enum.Enum):
    NOTHING = 0
    OOM = 1
    GONE = 2  # the cgroup was removed: stop watching


class _Watch(Protocol):
    fd: int

    def poll(self) -> _Seen: ...

    def close(self) -> None: ...


def _read_counters(path: str) -> dict[str, int] | None:
    """A flat-keyed counters file, or None once the cgroup is gone (a removed cgroup's files may answer
    ENODEV rather than ENOENT)."""
    try:
        text = read_text(path)
    except OSError:
        return None
    return None if text is None else parse_kv(text, strict=False)


class _EventfdWatch:
    """v1: memory.oom_control's eventfd notifications."""

    def __init__(self, memory_dir: str) -> None:
        self.oom_control = os.path.join(memory_dir, "memory.oom_control")
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            # "<event fd> <fd of memory.oom_control>"; the kernel keeps its own references, so the
            # control file can be closed at once (as the Go library does).
            control = os.open(self.oom_control, os.O_RDONLY | os.O_CLOEXEC)
            try:
                request = os.open(os.path.join(memory_dir, "cgroup.event_control"), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(request, f"{self.fd} {control}".encode())
                finally:
                    os.close(request)
            finally:
                os.close(control)
            # From now on every kill is notified first. Kills counted already were not: report them once.
            # (Not the counter for every poll: the notification comes before the kill is counted, so a
            # notification read early and the count seen later would be one OOM reported twice.)
            self.missed = ((_read_counters(self.oom_control) or {}).get("oom_kill") or 0) > 0
        except BaseException:
            os.close(self.fd)
            raise

    def poll(self) -> _Seen:
        try:
            os.eventfd_read(self.fd)  # resets the counter: several OOMs since the last read are one event
            fired = True
        except BlockingIOError:
            fired = False
        if not os.path.exists(self.oom_control):
            return _Seen.GONE  # also what the removal's own notification looks like
        missed, self.missed = self.missed, False
        return _Seen.OOM if fired or missed else _Seen.NOTHING

    def close(self) -> None:
        # Closing the eventfd also makes the kernel drop its registration (EPOLLHUP on the eventfd).
        os.close(self.fd)


class _InotifyWatch:
    """v2: memory.events' oom_kill counter, re-read whenever the kernel notifies a change."""

    def __init__(self, cgroup_dir: str) -> None:
        self.events = os.path.join(cgroup_dir, "memory.events")
        self.kills = 0  # from zero: see the module's docstring
        self.fd = inotify_watch(self.events, IN_MODIFY)

    def poll(self) -> _Seen:
        mask = inotify_drain(self.fd)
        counters = _read_counters(self.events)
        if counters is None:
            return _Seen.GONE
        kills = counters.get("oom_kill", counters.get("oom", 0))
        if kills > self.kills:
            self.kills = kills
            return _Seen.OOM
        return _Seen.GONE if mask & IN_IGNORED else _Seen.NOTHING

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Entry:
    watch: _Watch
    on_oom: OnOOM
    loop: asyncio.AbstractEventLoop


class OOMWatcher:
    """One per shim: watches containers' cgroups and calls ``on_oom(container_id)`` on the loop."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def add(self, container_id: str, cgroup: Cgroup, on_oom: OnOOM) -> None:
        """Watch ``cgroup`` for ``container_id`` (replacing an earlier watch). Call from the running loop.
        Raises CgroupError/OSError when the cgroup cannot be watched (no memory controller, gone).
        ``on_oom(container_id)`` runs on the loop, never from inside ``add``."""
        loop = asyncio.get_running_loop()
        self.remove(container_id)
        watch: _Watch
        if isinstance(cgroup, CgroupV1):
            if "memory" not in cgroup.paths:
                raise CgroupError(f"container {container_id}: no memory cgroup to watch for OOM")
            watch = _EventfdWatch(cgroup.dir("memory"))
        else:
            watch = _InotifyWatch(cgroup.path)
        self._entries[container_id] = _Entry(watch, on_oom, loop)
        loop.add_reader(watch.fd, self._ready, container_id)
        # A kill before the watch existed has no notification to come: look once, after the caller's
        # synchronous work (so after the TaskStart it publishes right after adding).
        loop.call_soon(self._ready, container_id)

    def flush(self, container_id: str) -> bool:
        """Deliver now an OOM the loop has not dispatched yet; True if ``on_oom`` was called. Call it when
        a process of the container exited, before publishing that exit."""
        return self._check(container_id)

    def remove(self, container_id: str) -> None:
        """Stop watching and close the fds; a container not watched (or no longer) is fine."""
        entry = self._entries.pop(container_id, None)
        if entry is None:
            return
        entry.loop.remove_reader(entry.watch.fd)
        entry.watch.close()

    def close(self) -> None:
        for container_id in list(self._entries):
            self.remove(container_id)

    def __contains__(self, container_id: str) -> bool:
        return container_id in self._entries

    def _ready(self, container_id: str) -> None:
        self._check(container_id)

    def _check(self, container_id: str) -> bool:
        entry = self._entries.get(container_id)
        if entry is None:
            return False
        try:
            seen = entry.watch.poll()
        except (OSError, ValueError):
            log.exception("container %s: reading its OOM notifications", container_id)
            seen = _Seen.GONE  # an fd or file that errors would wake the loop forever
        if seen is _Seen.GONE:
            self.remove(container_id)
            return False
        if seen is _Seen.NOTHING:
            return False
        try:
            entry.on_oom(container_id)
        except Exception:
            log.exception("container %s: OOM callback failed", container_id)
        return True
