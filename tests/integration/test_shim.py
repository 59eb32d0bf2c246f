"""The shim under real containerd and runc, differential against the Go shim (the oracle).

Each scenario runs once through io.containerd.runc.v2 and once through io.containerd.pyrunc.v2 and
the observable results — exit codes, output, error text, event sequences — must be the same.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tools.stack import PYRUNC, RUNC_V2

RUNTIMES = {"go": RUNC_V2, "py": PYRUNC}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def both(fn):
    """Run ``fn(runtime, tag)`` for the Go shim and ours; return {tag: result}."""
    return {tag: fn(runtime, tag) for tag, runtime in RUNTIMES.items()}


def same(results: dict):
    assert results["py"] == results["go"], f"pyrunc differs from the Go shim: {results}"
    return results["py"]


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


@pytest.fixture
def stack(containerd, busybox_image):
    return containerd


# -- run ----------------------------------------------------------------------------------------
def test_run_exit_code_and_stdio_separation(stack, busybox_image):
    def scenario(runtime, tag):
        r = stack.ctr("run", "--rm", "--runtime", runtime, busybox_image, uid(tag), "sh", "-c",
                      "echo out; echo err >&2; echo out2; exit 3", check=False)
        return r.returncode, r.stdout, r.stderr

    assert same(both(scenario)) == (3, "out\nout2\n", "err\n")


def test_run_rootfs_directory(stack, busybox_rootfs):
    def scenario(runtime, tag):
        r = stack.ctr("run", "--rm", "--runtime", runtime, "--rootfs", str(busybox_rootfs), uid(tag),
                      "/bin/sh", "-c", "echo from-rootfs; ls /bin/busybox", check=False)
        return r.returncode, r.stdout, r.stderr

    assert same(both(scenario)) == (0, "from-rootfs\n/bin/busybox\n", "")


def test_stdin_is_relayed(stack, busybox_image):
    # ctr run never sends CloseIO and a client closing its FIFO is no EOF (as with the Go shim), so the
    # process reads a known amount rather than waiting for EOF.
    data = "".join(f"line {i}\n" for i in range(2000))

    def scenario(runtime, tag):
        r = stack.ctr("run", "--rm", "--runtime", runtime, busybox_image, uid(tag), "sh", "-c",
                      "head -n 2000; echo done", input=data.encode(), check=False)
        return r.returncode, r.stdout

    assert same(both(scenario)) == (0, data + "done\n")


def test_output_of_a_fast_exit_is_complete(stack, busybox_image):
    def scenario(runtime, tag):
        r = stack.ctr("run", "--rm", "--runtime", runtime, busybox_image, uid(tag), "sh", "-c",
                      "seq 1 20000; seq 1 500 >&2", check=False)
        return r.returncode, len(r.stdout), r.stdout.splitlines()[-1], len(r.stderr.splitlines())

    assert same(both(scenario)) == (0, len("".join(f"{i}\n" for i in range(1, 20001))), "20000", 500)


def test_missing_binary_fails_create_the_same_way(stack, busybox_image):
    def scenario(runtime, tag):
        cid = uid(tag)
        r = stack.ctr("run", "--rm", "--runtime", runtime, busybox_image, cid, "/no/such/binary", check=False)
        cleanup(stack, cid)
        return r.returncode, re.sub(r"\s+", " ", r.stderr).strip()

    rc, err = same(both(scenario))
    assert rc != 0 and "OCI runtime create failed" in err and "no such file or directory" in err


# -- exec, kill, pause -------------------------------------------------------------------------
def test_exec_exit_code_output_and_duplicate_id(stack, busybox_image):
    def scenario(runtime, tag):
        cid = uid(tag)
        stack.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "1000")
        try:
            r1 = stack.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo hi; echo oops >&2; exit 5",
                           check=False)
            long = stack.ctr_popen("task", "exec", "--exec-id", "e2", cid, "sleep", "1000")
            time.sleep(0.5)
            dup = stack.ctr("task", "exec", "--exec-id", "e2", cid, "true", check=False)
            ps = stack.ctr("task", "ps", cid).stdout.splitlines()[1:]
            stack.ctr("task", "kill", "--exec-id", "e2", cid)
            long.wait(10)
            return (r1.returncode, r1.stdout, r1.stderr, dup.returncode, dup.stderr.strip(), len(ps),
                    sum("ExecID:e2" in line for line in ps), long.returncode)
        finally:
            cleanup(stack, cid)

    result = same(both(scenario))
    assert result[:5] == (5, "hi\n", "oops\n", 1, "ctr: id e2: already exists")
    assert result[5:] == (2, 1, 143)


def test_kill_with_signals(stack, busybox_image):
    script = 'trap "exit 42" TERM; while true; do sleep 0.05; done'

    def scenario(runtime, tag):
        cid = uid(tag)
        run = stack.ctr_popen("run", "--rm", "--runtime", runtime, busybox_image, cid, "sh", "-c", script,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_status(stack, cid, "RUNNING") == "RUNNING"
        time.sleep(0.3)
        stack.ctr("task", "kill", "-s", "TERM", cid)
        term_rc = run.wait(20)
        cid2 = uid(tag)
        run2 = stack.ctr_popen("run", "--rm", "--runtime", runtime, busybox_image, cid2, "sleep", "1000")
        assert wait_status(stack, cid2, "RUNNING") == "RUNNING"
        stack.ctr("task", "kill", "-s", "KILL", cid2)
        kill_rc = run2.wait(20)
        return term_rc, kill_rc

    assert same(both(scenario)) == (42, 137)


def test_kill_all_reaches_every_process(stack, busybox_image):
    def scenario(runtime, tag):
        cid = uid(tag)
        stack.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sh", "-c",
                  "sleep 1000 & sleep 1000 & wait")
        try:
            time.sleep(0.5)
            before = len(stack.ctr("task", "ps", cid).stdout.splitlines()[1:])
            stack.ctr("task", "kill", "-a", "-s", "KILL", cid)
            status = wait_status(stack, cid, "STOPPED")
            return before, status
        finally:
            cleanup(stack, cid)

    assert same(both(scenario)) == (3, "STOPPED")


def test_pause_resume_and_delete_running_refused(stack, busybox_image):
    def scenario(runtime, tag):
        cid = uid(tag)
        stack.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "1000")
        try:
            stack.ctr("task", "pause", cid)
            paused = wait_status(stack, cid, "PAUSED")
            again = stack.ctr("task", "pause", cid, check=False).returncode != 0
            stack.ctr("task", "resume", cid)
            running = wait_status(stack, cid, "RUNNING")
            refused = stack.ctr("task", "delete", cid, check=False)
            return paused, again, running, refused.returncode, refused.stderr.splitlines()[-1]
        finally:
            cleanup(stack, cid)

    assert same(both(scenario)) == (
        "PAUSED", True, "RUNNING", 1, "ctr: task must be stopped before deletion: running: failed precondition")


# -- events --------------------------------------------------------------------------------------
def test_event_sequences_match_the_go_shim(stack, busybox_image):
    def scenario(runtime, tag):
        events = Events(stack)
        cid = uid(tag)
        try:
            stack.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sh", "-c", "sleep 1.5; exit 4")
            stack.ctr("task", "exec", "--exec-id", "quick", cid, "sh", "-c", "exit 2", check=False)
            stack.ctr("task", "pause", cid)
            stack.ctr("task", "resume", cid)
            # still running when init exits: the kernel kills it, and its exit must come first (#9719)
            stack.ctr_popen("task", "exec", "--exec-id", "long", cid, "sleep", "1000",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert wait_status(stack, cid, "STOPPED", timeout=15) == "STOPPED"
            stack.ctr("task", "delete", cid)
            stack.ctr("container", "delete", cid)
        finally:
            seq = task_events(events.stop(), cid)
            cleanup(stack, cid)
        return seq

    seq = same(both(scenario))
    assert seq == [
        ("/tasks/create",), ("/tasks/start",),
        ("/tasks/exec-added", "quick"), ("/tasks/exec-started", "quick"), ("/tasks/exit", "quick", 2),
        ("/tasks/paused",), ("/tasks/resumed",),
        ("/tasks/exec-added", "long"), ("/tasks/exec-started", "long"), ("/tasks/exit", "long", 137),
        ("/tasks/exit", "init", 4), ("/tasks/delete", 4),
    ]


def test_run_rm_event_sequence(stack, busybox_image):
    def scenario(runtime, tag):
        events = Events(stack)
        cid = uid(tag)
        stack.ctr("run", "--rm", "--runtime", runtime, busybox_image, cid, "true")
        return task_events(events.stop(), cid)

    assert same(both(scenario)) == [("/tasks/create",), ("/tasks/start",), ("/tasks/exit", "init", 0),
                                    ("/tasks/delete", 0)]


# -- the shim process ----------------------------------------------------------------------------
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


def test_thirty_short_containers_leave_no_zombie_and_no_shim(stack, busybox_image):
    before = set(zombies())
    for i in range(30):
        r = stack.ctr("run", "--rm", "--runtime", PYRUNC, busybox_image, uid(f"short{i}"), "sh", "-c",
                      f"echo {i}; exit {i % 3}", check=False)
        assert (r.returncode, r.stdout) == (i % 3, f"{i}\n")
        shims = set(stack.shim_pids())
        assert not [z for z, parent in zombies().items() if parent in shims], "a shim left a child unreaped"
    time.sleep(0.5)
    assert stack.shim_pids() == []
    # Exited shims are reparented to this machine's pid 1, which may reap them only every second or so.
    deadline = time.monotonic() + 10
    while set(zombies()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(zombies()) - before == set()


def test_shim_logs_reach_containerd_log(stack, busybox_image):
    stack.ctr("run", "--rm", "--runtime", PYRUNC, busybox_image, uid("logs"), "true")
    assert "pyrunc shim serving" in stack.log()
