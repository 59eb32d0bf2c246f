"""Metrics and OOM through ctr, differential against the Go shim."""

from __future__ import annotations

import json
import uuid

from tests.integration.test_races import remove
from tests.integration.test_shim import RUNTIMES, Events, same, task_events, wait_status

# doubles a shell string until the 32 MiB limit kills it
HOG = "x=a; while true; do x=$x$x; done"


def metric_names(output: str) -> list[str]:
    """The METRIC column of `ctr task metrics` (the values differ from run to run)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("METRIC"))
    return [line.split()[0] for line in lines[start + 1:] if line.strip()]


def keys(value, prefix: str = "") -> set[str]:
    """Every key path in a JSON document (list items share their parent's path)."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in {prefix + k} | keys(v, prefix + k + ".")}
    if isinstance(value, list):
        return {p for v in value for p in keys(v, prefix)}
    return set()


def test_ctr_task_metrics_shows_the_same_fields(containerd, busybox_image):
    def scenario(runtime, tag):
        cid = f"{tag}-metrics-{uuid.uuid4().hex[:6]}"
        containerd.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "1000")
        try:
            table = metric_names(containerd.ctr("task", "metrics", cid).stdout)
            doc = json.loads(containerd.ctr("task", "metrics", "--format", "json", cid).stdout)
            # zero values are left out of the JSON, so only the sections are comparable across containers
            return table, sorted(k for k in keys(doc) if "." not in k)
        finally:
            remove(containerd, cid)

    table, fields = same({tag: scenario(rt, tag) for tag, rt in RUNTIMES.items()})
    assert "memory.usage_in_bytes" in table and "pids.current" in table
    assert {"memory", "cpu", "pids"} <= set(fields), fields


def test_oom_kill_publishes_oom_before_exit_137(containerd, busybox_image):
    def scenario(runtime, tag):
        cid = f"{tag}-oom-{uuid.uuid4().hex[:6]}"
        events = Events(containerd)
        r = containerd.ctr("run", "--rm", "--runtime", runtime, "--memory-limit", str(32 << 20), busybox_image,
                           cid, "sh", "-c", HOG, check=False, timeout=120)
        seq = task_events(events.stop(), cid)
        return r.returncode, seq

    results = {tag: scenario(rt, tag) for tag, rt in RUNTIMES.items()}
    go_rc, go_seq = results["go"]
    py_rc, py_seq = results["py"]
    assert go_rc == py_rc == 137
    # the Go shim publishes OOMs from another goroutine, so its order may vary: compare as sets there
    assert sorted(map(str, py_seq)) == sorted(map(str, go_seq))
    assert py_seq == [("/tasks/create",), ("/tasks/start",), ("/tasks/oom",), ("/tasks/exit", "init", 137),
                      ("/tasks/delete", 137)]


def test_oom_watchers_are_released(containerd, busybox_image):
    import os

    from tests.integration.test_survival import shim_of

    cid = f"oomfd-{uuid.uuid4().hex[:6]}"
    group = f"oomfd-{uuid.uuid4().hex[:6]}"
    keeper = f"keeper-{uuid.uuid4().hex[:6]}"
    containerd.ctr("run", "-d", "--runtime", RUNTIMES["py"], "--annotation", f"io.containerd.runc.v2.group={group}",
                   busybox_image, keeper, "sleep", "1000")
    try:
        shim = shim_of(containerd, keeper)
        before = len(os.listdir(f"/proc/{shim}/fd"))
        for i in range(5):
            containerd.ctr("run", "-d", "--runtime", RUNTIMES["py"], "--annotation",
                           f"io.containerd.runc.v2.group={group}", busybox_image, f"{cid}-{i}", "sleep", "1000")
            remove(containerd, f"{cid}-{i}")
        assert wait_status(containerd, keeper, "RUNNING") == "RUNNING"
        assert len(os.listdir(f"/proc/{shim}/fd")) <= before, "a deleted container's OOM watcher leaked fds"
    finally:
        remove(containerd, keeper)
