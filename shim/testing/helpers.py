"""Helpers for differential scenarios under a :class:`~shim.testing.stack.PrivateContainerd`.

A scenario is a function ``scenario(runtime, tag)`` that drives containerd through ``ctr`` with
``--runtime runtime`` and returns what a client can observe (exit codes, output, error text, event
sequences). :func:`run_each` runs it once per runtime; :func:`same` asserts that every runtime gave the
oracle's result. ``tag`` names the run (container ids are made from it), so two runs of one runtime
(the Go shim against itself) never collide.

Standard library only, like the stack: the shim binary never imports this package.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run_each(runtimes: dict[str, str], fn: Callable[[str, str], Any]) -> dict[str, Any]:
    """Run ``fn(runtime, tag)`` for each ``{tag: runtime}`` in order (the oracle first); {tag: result}."""
    return {tag: fn(runtime, tag) for tag, runtime in runtimes.items()}


def same(results: dict[str, Any]) -> Any:
    """The result every runtime gave; the first entry is the oracle's, and each other must equal it."""
    (oracle, expected), *others = results.items()
    for tag, got in others:
        assert got == expected, f"{tag} differs from {oracle} (the oracle): {results}"
    return expected


def cleanup(stack, cid: str) -> None:
    stack.ctr("task", "kill", "-s", "KILL", cid, check=False)
    for _ in range(50):
        if stack.ctr("task", "delete", cid, check=False).returncode == 0 or "not found" in stack.ctr(
            "task", "ls", check=False
        ).stdout:
            break
        if cid not in stack.ctr("task", "ls", "-q", check=False).stdout.split():
            break
        time.sleep(0.1)
    stack.ctr("container", "delete", cid, check=False)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_status(stack, cid: str, want: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        for line in stack.ctr("task", "ls", check=False).stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == cid:
                status = parts[2]
        if status == want:
            return status
        time.sleep(0.05)
    return status


class Events:
    """``ctr events`` in the background; lines parsed into (topic, payload dict)."""

    def __init__(self, stack) -> None:
        self.path = stack.dir / f"events-{uuid.uuid4().hex[:6]}.txt"
        self.proc = stack.ctr_popen("events", stdout=open(self.path, "wb"), stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def stop(self) -> list[tuple[str, dict]]:
        time.sleep(0.5)
        self.proc.kill()
        self.proc.wait()
        out = []
        for line in self.path.read_text().splitlines():
            m = re.match(r"^\S+ \S+ \S+ UTC (\S+) (/\S+) (.*)$", line)
            if m:
                try:
                    out.append((m.group(2), json.loads(m.group(3))))
                except ValueError:
                    out.append((m.group(2), {}))
        return out


def task_events(events: list[tuple[str, dict]], cid: str) -> list[tuple]:
    """The /tasks/* sequence of one container, ids and pids abstracted away."""
    seq = []
    for topic, body in events:
        if not topic.startswith("/tasks/") or body.get("container_id") != cid:
            continue
        entry: tuple = (topic,)
        if "exec_id" in body:
            entry += (body["exec_id"],)
        if topic == "/tasks/exit":
            entry += ("init" if body.get("id") == cid else body.get("id"), body.get("exit_status", 0))
        if topic == "/tasks/delete":
            entry += (body.get("exit_status", 0),)
        seq.append(entry)
    return seq


def zombies() -> dict[int, int]:
    """pid → parent pid of every zombie on the machine."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] == "Z":
                    found[int(entry)] = int(fields[1])
            except (OSError, IndexError):
                pass
    return found
