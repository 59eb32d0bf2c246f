"""Update (runc update) and runtime options reaching runc, against real containerd."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import uuid
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.ttrpc import Client, Code, TTRPCError
from tests.integration.test_races import remove, start_detached
from tests.integration.test_survival import shim_of
from tools.stack import PYRUNC

TASK = "containerd.task.v2.Task"


def cgroup_dir(pid: int, controller: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    raise AssertionError(f"no {controller} cgroup for {pid}")


def test_update_changes_the_cgroup(containerd, busybox_image):
    cid, _, sock = start_detached(containerd, busybox_image, "sleep", "1000")
    resources = {"memory": {"limit": 64 << 20}, "cpu": {"shares": 512}, "pids": {"limit": 77}}

    async def main() -> int:
        async with await Client.connect(sock) as client:
            state = await client.call(TASK, "State", api.StateRequest(id=cid), api.StateResponse, timeout=10)
            await client.call(TASK, "Update", api.UpdateTaskRequest(
                id=cid, resources=any_pb2.Any(type_url="x", value=json.dumps(resources).encode()),
                annotations={"example.com/why": "test"}), timeout=10)
            for bad in (b"{nope", b"[1]"):
                try:
                    await client.call(TASK, "Update", api.UpdateTaskRequest(
                        id=cid, resources=any_pb2.Any(type_url="x", value=bad)), timeout=10)
                    raise AssertionError("bad resources accepted")
                except TTRPCError as e:
                    assert e.code == Code.INVALID_ARGUMENT
            return state.pid

    try:
        pid = asyncio.run(main())
        assert (cgroup_dir(pid, "memory") / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        assert (cgroup_dir(pid, "cpu") / "cpu.shares").read_text().strip() == "512"
        assert (cgroup_dir(pid, "pids") / "pids.max").read_text().strip() == "77"
    finally:
        remove(containerd, cid)


def test_runtime_config_file_reaches_runc(containerd, busybox_image, tmp_path):
    """containerd sends runtimeoptions.v1.Options{config_path} to runtimes other than runc.v2; the file's
    binary_name and root must be what runc is run as."""
    record = tmp_path / "argv.log"
    wrapper = tmp_path / "runc-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexec runc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    root = tmp_path / "runc-root"
    config = tmp_path / "pyrunc.toml"
    config.write_text(f'binary_name = "{wrapper}"\nroot = "{root}"\nno_pivot_root = true\nno_new_keyring = true\n')
    cid = f"opts-{uuid.uuid4().hex[:6]}"
    r = containerd.ctr("run", "--rm", "--runtime", PYRUNC, "--runtime-config-path", str(config), busybox_image,
                       cid, "echo", "through the wrapper")
    assert r.stdout == "through the wrapper\n"
    calls = record.read_text().splitlines()
    verbs = [c.split()[4] if c.startswith("--root") else c for c in calls]
    assert any(" create " in f" {c} " for c in calls) and any(" start " in f" {c} " for c in calls), verbs
    assert all(c.startswith(f"--root {root}/{containerd.namespace} ") for c in calls), calls
    create = next(c for c in calls if " create " in f" {c} ")
    assert " --no-pivot " in create and " --no-new-keyring " in create, create
    assert not os.path.exists(root / containerd.namespace / cid), "the container is gone from the custom root"


def test_bad_runtime_config_is_a_clear_create_error(containerd, busybox_image, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("binary_name = 42\n")
    cid = f"badopts-{uuid.uuid4().hex[:6]}"
    r = containerd.ctr("run", "--rm", "--runtime", PYRUNC, "--runtime-config-path", str(config), busybox_image,
                       cid, "true", check=False)
    containerd.ctr("container", "delete", cid, check=False)
    assert r.returncode != 0 and "binary_name must be str" in r.stderr and "invalid argument" in r.stderr


def test_shim_cgroup_option_moves_the_shim(containerd, busybox_image, tmp_path):
    name = f"pyrunc-shim-{uuid.uuid4().hex[:6]}"
    dirs = [Path("/sys/fs/cgroup") / c / name for c in ("memory", "pids")]
    if not all(d.parent.is_dir() for d in dirs):
        pytest.skip("needs cgroup v1 memory and pids hierarchies")
    for d in dirs:
        d.mkdir()
    config = tmp_path / "pyrunc.toml"
    config.write_text(f'shim_cgroup = "/{name}"\n')
    cid = f"shimcg-{uuid.uuid4().hex[:6]}"
    try:
        containerd.ctr("run", "-d", "--runtime", PYRUNC, "--runtime-config-path", str(config), busybox_image,
                       cid, "sleep", "1000")
        shim = shim_of(containerd, cid)
        assert str(shim) in (dirs[0] / "cgroup.procs").read_text().split()
        assert f"memory:/{name}" in Path(f"/proc/{shim}/cgroup").read_text()
    finally:
        remove(containerd, cid)
        for d in dirs:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    asyncio.run(asyncio.sleep(0.1))  # the shim leaves the cgroup when it exits
