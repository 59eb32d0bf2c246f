"""shim.testing, the harness other shims' authors load into their pytest: light to import, kept out of
the shim binary, and finding runtimes' binaries where containerd would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shim.testing.stack import PrivateContainerd, shim_binary_name

REPO = Path(__file__).resolve().parents[2]


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code`` (this checkout first on sys.path)."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    ).stdout
    return set(out.split())


def test_the_harness_imports_no_asyncio_and_no_protobuf():
    # A pytest plugin loads into the author's process before any test: it must not drag our runtime in.
    mods = loaded_after("import shim.testing.plugin, shim.testing.helpers, shim.testing.conformance")
    assert {"shim.testing.plugin", "shim.testing.conformance"} <= mods
    assert not {m for m in mods if m == "asyncio" or m.startswith(("google.protobuf", "shim.api"))}


def test_the_shim_binary_does_not_import_the_harness():
    mods = loaded_after("import shim.cli")
    assert not [m for m in mods if m.startswith("shim.testing")]


@pytest.mark.parametrize(("runtime", "binary"), [
    ("io.containerd.runc.v2", "containerd-shim-runc-v2"),
    ("io.containerd.pyrunc.v2", "containerd-shim-pyrunc-v2"),
    ("example.com.foo.v1", "containerd-shim-foo-v1"),
    ("runc", ""),
])
def test_shim_binary_name_is_containerds(runtime, binary):
    assert shim_binary_name(runtime) == binary


@pytest.fixture
def unstarted_stack():
    stack = PrivateContainerd()  # makes its temp dir only; nothing runs until start()
    try:
        yield stack
    finally:
        shutil.rmtree(stack.dir, ignore_errors=True)


def test_a_runtime_resolves_on_the_callers_path_or_as_an_absolute_path(unstarted_stack, tmp_path, monkeypatch):
    shim = tmp_path / "containerd-shim-foo-v2"
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    monkeypatch.chdir(tmp_path / "..")  # containerd also looks beside a relative runtime name (its cwd)
    assert unstarted_stack.resolve_runtime("io.containerd.foo.v2") == str(shim)
    assert unstarted_stack.resolve_runtime(str(shim)) == str(shim)
    assert unstarted_stack.resolve_runtime(str(tmp_path / "nothing")) is None
    assert unstarted_stack.resolve_runtime("io.containerd.nosuchshim.v2") is None
    assert unstarted_stack.resolve_runtime("runc") is None


def test_stop_removes_empty_namespace_cgroups_only(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    for hierarchy in ("memory", "cpu", "pids"):
        (root / hierarchy / "ns1").mkdir(parents=True)
        (root / hierarchy / "other-ns").mkdir()
    (root / "pids" / "ns1" / "c1").mkdir()  # still holds a container's cgroup: left alone
    stack = PrivateContainerd(namespace="ns1")
    try:
        stack.remove_namespace_cgroups(str(root))
    finally:
        shutil.rmtree(stack.dir, ignore_errors=True)
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("*/*")) == [
        "cpu/other-ns", "memory/other-ns", "pids/ns1", "pids/other-ns"]


def test_stop_removes_dead_shim_sockets_that_appeared_only(tmp_path: Path) -> None:
    import socket

    sockdir = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))  # tmp_path is too long for socket paths
    try:
        old_dead = sockdir / "old"
        socket.socket(socket.AF_UNIX).bind(str(old_dead))  # there before: not ours to judge
        stack = PrivateContainerd(namespace="ns1")
        stack._sockets_before = set(os.listdir(sockdir))
        dead, live = sockdir / "dead", sockdir / "live"
        socket.socket(socket.AF_UNIX).bind(str(dead))  # bound, closed: what a killed shim leaves
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(live))
            server.listen()
            try:
                stack.remove_dead_sockets(str(sockdir))
            finally:
                shutil.rmtree(stack.dir, ignore_errors=True)
            assert sorted(os.listdir(sockdir)) == ["live", "old"]
    finally:
        shutil.rmtree(sockdir)
