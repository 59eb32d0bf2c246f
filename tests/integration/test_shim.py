"""pyrunc's own tests of the shim process under real containerd and runc, plus the helpers the other
integration modules share.

The differential scenarios (each run through the Go shim, the oracle, and through pyrunc, results
compared) live in shim/testing/conformance.py, run here by tests/integration/test_conformance.py; their
helpers live in shim/testing/helpers.py and are re-exported below for the modules that import them
from here.
"""

from __future__ import annotations

import time

import pytest

from shim.testing.helpers import (
    Events,
    cleanup,
    run_each,
    same,
    task_events,
    uid,
    wait_status,
    zombies,
)
from tools.stack import PYRUNC, RUNC_V2

# The oracle first: same() compares every other result with the first one.
RUNTIMES = {"go": RUNC_V2, "py": PYRUNC}

__all__ = ["RUNTIMES", "Events", "both", "cleanup", "same", "task_events", "uid", "wait_status", "zombies"]


def both(fn):
    """Run ``fn(runtime, tag)`` for the Go shim and ours; return {tag: result}."""
    return run_each(RUNTIMES, fn)


@pytest.fixture
def stack(containerd, busybox_image):
    return containerd


# -- the shim process ----------------------------------------------------------------------------
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
