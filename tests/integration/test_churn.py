"""Churn: many containers with concurrent execs, and exec storms; every exit exactly once, in order,
no zombie, the shim's fds and memory flat. CI runs a bounded version; `-m slow` the long one."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_shim import Events, wait_status, zombies
from tests.integration.test_survival import shim_of
from tools.stack import PYRUNC


def churn(stack, image: str, containers: int, workers: int) -> None:
    events = Events(stack)
    zombies_before = set(zombies())
    expected: dict[str, list[tuple[str, int]]] = {}

    def one(i: int) -> None:
        cid = f"churn{i}-{uuid.uuid4().hex[:6]}"
        stack.ctr("run", "-d", "--runtime", PYRUNC, image, cid, "sh", "-c", "sleep 2; exit 7")
        with ThreadPoolExecutor(3) as pool:
            quick = pool.submit(stack.ctr, "task", "exec", "--exec-id", "quick", cid, "sh", "-c", "exit 3",
                                check=False)
            long = pool.submit(stack.ctr, "task", "exec", "--exec-id", "long", cid, "sleep", "1000", check=False)
            instant = pool.submit(stack.ctr, "task", "exec", "--exec-id", "instant", cid, "true", check=False)
            assert quick.result(30).returncode == 3
            assert instant.result(30).returncode == 0
            # init exits after 2 s; the kernel then kills "long", whose Wait must still be answered
            assert long.result(30).returncode == 137
        assert wait_status(stack, cid, "STOPPED", timeout=20) == "STOPPED"
        stack.ctr("task", "delete", cid)
        stack.ctr("container", "delete", cid)
        expected[cid] = [("quick", 3), ("instant", 0), ("long", 137), ("init", 7)]

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(one, i) for i in range(containers)]:
            f.result(120)
    seen = events.stop()
    for cid, want in expected.items():
        exits = [("init" if b.get("id") == cid else b.get("id"), b.get("exit_status", 0))
                 for t, b in seen if t == "/tasks/exit" and b.get("container_id") == cid]
        assert Counter(exits) == Counter(want), f"{cid}: exits {exits}"  # none lost, none duplicated
        assert exits[-1] == ("init", 7), f"{cid}: an exec's exit came after init's: {exits}"
    deadline = time.monotonic() + 10
    while set(zombies()) - zombies_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(zombies()) - zombies_before == set()
    assert stack.shim_pids() == []


def fds_and_rss(pid: int) -> tuple[int, int]:
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss


def exec_storm(stack, image: str, rounds: int, per_round: int) -> None:
    cid = f"storm-{uuid.uuid4().hex[:6]}"
    stack.ctr("run", "-d", "--runtime", PYRUNC, image, cid, "sleep", "1000")
    try:
        shim = shim_of(stack, cid)
        samples = []
        n = 0
        for _ in range(rounds):
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(stack.ctr, "task", "exec", "--exec-id", f"x{n + i}", cid, "sh", "-c",
                                       f"exit {(n + i) % 5}", check=False) for i in range(per_round)]
                codes = [f.result(60).returncode for f in futures]
            assert codes == [(n + i) % 5 for i in range(per_round)]
            n += per_round
            samples.append(fds_and_rss(shim))
        fds = [s[0] for s in samples]
        rss = [s[1] for s in samples]
        assert max(fds[1:]) <= fds[0], f"shim fds grow: {fds}"
        assert rss[-1] - rss[1] < 4096, f"shim RSS grows (kB): {rss}"
    finally:
        stack.ctr("task", "kill", "-s", "KILL", cid, check=False)
        wait_status(stack, cid, "STOPPED")
        stack.ctr("task", "delete", cid, check=False)
        stack.ctr("container", "delete", cid, check=False)


def test_churn_bounded(containerd, busybox_image):
    churn(containerd, busybox_image, containers=12, workers=4)


def test_exec_storm_bounded(containerd, busybox_image):
    exec_storm(containerd, busybox_image, rounds=4, per_round=25)


@pytest.mark.slow
def test_churn_soak(containerd, busybox_image):
    churn(containerd, busybox_image, containers=300, workers=8)


@pytest.mark.slow
def test_exec_storm_soak(containerd, busybox_image):
    exec_storm(containerd, busybox_image, rounds=20, per_round=50)
