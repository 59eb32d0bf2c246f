"""Conformance of a containerd shim, differential against an oracle (by default containerd's Go shim).

Each scenario runs once through the oracle and once through the shim under test (the ``runtimes``
fixture of :mod:`shim.testing.plugin`) in one private containerd, and what a client observes — exit
codes, output, error text, event sequences — must be the same; the oracle's result is also checked
against what it is known to be, so a broken setup does not pass as agreement.

Run it for any shim (root, containerd, runc, busybox-static; ``containerd-shim-<name>-<version>`` on
PATH)::

    python -m pytest -p shim.testing.plugin --pyargs shim.testing.conformance --runtime io.containerd.foo.v2

or import the scenarios into a test module of a suite that registers the plugin
(``from shim.testing.conformance import *``), as pyrunc's own tests/integration/test_conformance.py does.
"""

from __future__ import annotations

import re
import subprocess
import time

from shim.testing.helpers import Events, cleanup, run_each, same, task_events, uid, wait_status


# -- run ----------------------------------------------------------------------------------------
def test_run_exit_code_and_stdio_separation(containerd, busybox_image, runtimes):
    def scenario(runtime, tag):
        r = containerd.ctr("run", "--rm", "--runtime", runtime, busybox_image, uid(tag), "sh", "-c",
                           "echo out; echo err >&2; echo out2; exit 3", check=False)
        return r.returncode, r.stdout, r.stderr

    assert same(run_each(runtimes, scenario)) == (3, "out\nout2\n", "err\n")


def test_run_rootfs_directory(containerd, busybox_rootfs, runtimes):
    def scenario(runtime, tag):
        r = containerd.ctr("run", "--rm", "--runtime", runtime, "--rootfs", str(busybox_rootfs), uid(tag),
                           "/bin/sh", "-c", "echo from-rootfs; ls /bin/busybox", check=False)
        return r.returncode, r.stdout, r.stderr

    assert same(run_each(runtimes, scenario)) == (0, "from-rootfs\n/bin/busybox\n", "")


def test_stdin_is_relayed(containerd, busybox_image, runtimes):
    # ctr run never sends CloseIO and a client closing its FIFO is no EOF (as with the Go shim), so the
    # process reads a known amount rather than waiting for EOF.
    data = "".join(f"line {i}\n" for i in range(2000))

    def scenario(runtime, tag):
        r = containerd.ctr("run", "--rm", "--runtime", runtime, busybox_image, uid(tag), "sh", "-c",
                           "head -n 2000; echo done", input=data.encode(), check=False)
        return r.returncode, r.stdout

    assert same(run_each(runtimes, scenario)) == (0, data + "done\n")


def test_output_of_a_fast_exit_is_complete(containerd, busybox_image, runtimes):
    expected_out = "".join(f"{i}\n" for i in range(1, 20001))
    expected_err = "".join(f"{i}\n" for i in range(1, 501))

    def scenario(runtime, tag):
        r = containerd.ctr("run", "--rm", "--runtime", runtime, busybox_image, uid(tag), "sh", "-c",
                           "seq 1 20000; seq 1 500 >&2", check=False)
        return r.returncode, r.stdout, r.stderr

    results = run_each(runtimes, scenario)
    assert results["subject"] == (0, expected_out, expected_err)
    # The Go shim with containerd 1.6 can lose the tail of a fast exit's output (its copy races
    # Task.Delete closing the FIFOs): the oracle must agree on what it did deliver.
    rc, out, err = results["oracle"]
    assert rc == 0 and expected_out.startswith(out) and expected_err.startswith(err)


def test_missing_binary_fails_create_the_same_way(containerd, busybox_image, runtimes):
    def scenario(runtime, tag):
        cid = uid(tag)
        r = containerd.ctr("run", "--rm", "--runtime", runtime, busybox_image, cid, "/no/such/binary", check=False)
        cleanup(containerd, cid)
        return r.returncode, re.sub(r"\s+", " ", r.stderr).strip()

    rc, err = same(run_each(runtimes, scenario))
    assert rc != 0 and "OCI runtime create failed" in err and "no such file or directory" in err


# -- exec, kill, pause -------------------------------------------------------------------------
def test_exec_exit_code_output_and_duplicate_id(containerd, busybox_image, runtimes):
    stack = containerd

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

    result = same(run_each(runtimes, scenario))
    assert result[:5] == (5, "hi\n", "oops\n", 1, "ctr: id e2: already exists")
    assert result[5:] == (2, 1, 143)


def test_kill_with_signals(containerd, busybox_image, runtimes):
    stack = containerd
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

    assert same(run_each(runtimes, scenario)) == (42, 137)


def test_kill_all_reaches_every_process(containerd, busybox_image, runtimes):
    stack = containerd

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

    assert same(run_each(runtimes, scenario)) == (3, "STOPPED")


def test_pause_resume_and_delete_running_refused(containerd, busybox_image, runtimes):
    stack = containerd

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

    assert same(run_each(runtimes, scenario)) == (
        "PAUSED", True, "RUNNING", 1, "ctr: task must be stopped before deletion: running: failed precondition")


# -- events --------------------------------------------------------------------------------------
def test_event_sequences_match_the_oracle(containerd, busybox_image, runtimes):
    stack = containerd

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

    seq = same(run_each(runtimes, scenario))
    assert seq == [
        ("/tasks/create",), ("/tasks/start",),
        ("/tasks/exec-added", "quick"), ("/tasks/exec-started", "quick"), ("/tasks/exit", "quick", 2),
        ("/tasks/paused",), ("/tasks/resumed",),
        ("/tasks/exec-added", "long"), ("/tasks/exec-started", "long"), ("/tasks/exit", "long", 137),
        ("/tasks/exit", "init", 4), ("/tasks/delete", 4),
    ]


def test_run_rm_event_sequence(containerd, busybox_image, runtimes):
    def scenario(runtime, tag):
        events = Events(containerd)
        cid = uid(tag)
        containerd.ctr("run", "--rm", "--runtime", runtime, busybox_image, cid, "true")
        return task_events(events.stop(), cid)

    assert same(run_each(runtimes, scenario)) == [("/tasks/create",), ("/tasks/start",), ("/tasks/exit", "init", 0),
                                                  ("/tasks/delete", 0)]


# Exactly the scenarios: ``from shim.testing.conformance import *`` must bring no helper or fixture
# along (a test module's own names would be shadowed), and no new scenario may be left out of it.
__all__ = [name for name in list(globals()) if name.startswith("test_")]
