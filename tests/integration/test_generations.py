"""Our binary's ``start`` run by hand the way newer containerds run it, and the Go shim as the oracle.

containerd here is 1.6, which the rest of the suite drives (plain address, task v2). What 1.7, 2.0–2.2 and
2.3 would send — MAX_SHIM_VERSION in the environment, a BootstrapParams on stdin — is sent by hand
to the real binary in a temp bundle, next to the private containerd (its addresses, its namespace), and
the printed answer is read back as those containerds read it; then the address is called with task v3
(and v2) through our ttrpc client, and the server is shut down (killed by pid and its socket removed if
that fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim import cli
from shim.api.containerd.runc.v1 import options_pb2
from shim.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2 as boot
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import introspection_pb2
from shim.ttrpc import Client, Code, TTRPCError
from tools.stack import shim_binary

GO_SHIM = "containerd-shim-runc-v2"
# As tools.stack gives containerd: the checkout's launcher finds this Python (with protobuf) as python3.
PATH = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """The server that start forks outlives start: as subreaper we inherit it and can reap it."""
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int()
    assert libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) == 0
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


def gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` has exited within ``timeout``; reaped if it is our child (a server forked by the
    zygote is not: it belongs to init, which may reap it late, so a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
            except OSError:
                return True
        time.sleep(0.02)
    return False


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@pytest.fixture
def bundle(containerd, tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    """(container id, bundle, log FIFO reader): a bundle as containerd prepares one before start."""
    cid = f"gen-{uuid.uuid4().hex[:8]}"
    path = tmp_path / cid
    path.mkdir()
    (path / "config.json").write_text('{"ociVersion": "1.0.2", "annotations": {}}')
    os.mkfifo(path / "log")
    reader = os.open(path / "log", os.O_RDWR | os.O_NONBLOCK)  # held as containerd holds it
    yield cid, path, reader
    os.close(reader)


def run_start(containerd, cid: str, bundle: Path, env: dict[str, str], stdin: bytes,
              binary: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """``<shim> … start`` with containerd's flags, cwd and environment (pkg/shim/util.go Command)."""
    argv = [binary or shim_binary(), "-namespace", containerd.namespace, "-address", containerd.address,
            "-publish-binary", "/usr/bin/containerd", "-id", cid, "start"]
    full_env = {k: v for k, v in os.environ.items() if k not in ("MAX_SHIM_VERSION", "GRPC_ADDRESS", "NAMESPACE")}
    full_env.update(TTRPC_ADDRESS=containerd.ttrpc_address, PATH=PATH, **env)
    return subprocess.run(argv, cwd=bundle, env=full_env, input=stdin, capture_output=True, timeout=30)


async def call(sock: str, service: str, method: str, request, response_type=None):
    async with await Client.connect(sock) as client:
        return await client.call(service, method, request, response_type, timeout=10)


def code_of(sock: str, service: str, method: str, request) -> int:
    try:
        asyncio.run(call(sock, service, method, request))
    except TTRPCError as e:
        return e.code
    return Code.OK


def bootstrap(containerd, cid: str, socket_dir: str, options: any_pb2.Any) -> bytes:
    """What containerd 2.3's pkg/shim.Command writes on start's stdin."""
    return boot.BootstrapParams(
        instance_id=cid, namespace=containerd.namespace, log_level=boot.LOG_LEVEL_DEBUG,
        containerd_version="v2.3.0", containerd_ttrpc_address=containerd.ttrpc_address,
        containerd_grpc_address=containerd.address, containerd_binary="/usr/bin/containerd",
        extensions=[boot.Extension(value=options)], socket_dir=socket_dir).SerializeToString()


@contextlib.contextmanager
def shim_cgroup() -> Iterator[str | None]:
    """A fresh cgroup in the pids hierarchy (v1) or the unified one, to see the options reach the server
    (Options.shim_cgroup); None where none can be made."""
    name = f"pyrunc-gen-{uuid.uuid4().hex[:8]}"
    made = None
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        if os.path.isfile(os.path.join(root, "cgroup.procs")):
            try:
                os.mkdir(os.path.join(root, name))
                made = os.path.join(root, name)
                break
            except OSError:
                continue
    try:
        yield "/" + name if made else None
    finally:
        if made:
            for _ in range(50):
                try:
                    os.rmdir(made)
                    break
                except OSError:
                    time.sleep(0.1)


# Each later containerd's start: its environment, its stdin and how it reads the answer.
CASES = {
    "1.7 and 2.0-2.2": ({"MAX_SHIM_VERSION": "2"}, "any", "json", 2),
    "a caller promising version 3": ({"MAX_SHIM_VERSION": "3"}, "none", "json", 3),
    "2.3": ({"MAX_SHIM_VERSION": "2"}, "bootstrap", "protobuf", 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_start_by_hand_answers_and_serves_task_v3(case: str, containerd, bundle, tmp_path: Path) -> None:
    env, stdin_form, form, version = CASES[case]
    cid, path, log_reader = bundle
    env = dict(env, GRPC_ADDRESS=containerd.address, NAMESPACE=containerd.namespace)
    socket_dir = str(containerd.dir / f"s{uuid.uuid4().hex[:4]}")
    with shim_cgroup() as cgroup, subreaper():
        options = any_pb2.Any(type_url="containerd.runc.v1.Options",
                              value=options_pb2.Options(shim_cgroup=cgroup or "").SerializeToString())
        stdin = {"any": options.SerializeToString(), "none": b"",
                 "bootstrap": bootstrap(containerd, cid, socket_dir, options)}[stdin_form]
        pid = None
        sock = ""
        try:
            r = run_start(containerd, cid, path, env, stdin)
            assert (r.returncode, r.stderr) == (0, b""), r
            if form == "json":
                answer = json.loads(r.stdout)
                assert list(answer) == ["version", "address", "protocol"]
                got = (answer["version"], answer["address"], answer["protocol"])
                expected_address = cli.socket_address(containerd.address, containerd.namespace, cid)
            else:
                result = boot.BootstrapResult.FromString(r.stdout)
                got = (result.version, result.address, result.protocol)
                expected_address = cli.socket_address(containerd.address, containerd.namespace, cid, socket_dir)
            assert got == (version, expected_address, "ttrpc")
            assert (path / "address").read_text() == expected_address
            sock = expected_address.removeprefix("unix://")

            connected = asyncio.run(call(sock, "containerd.task.v3.Task", "Connect", api.ConnectRequest(id=cid),
                                         api.ConnectResponse))
            pid = connected.shim_pid
            assert pid > 0 and connected.task_pid == 0
            # v3 is served (an unknown service would be Unimplemented), and v2 for version-2 callers
            assert code_of(sock, "containerd.task.v3.Task", "State", api.StateRequest(id=cid)) == Code.NOT_FOUND
            assert code_of(sock, "containerd.task.v2.Task", "State", api.StateRequest(id=cid)) == Code.NOT_FOUND
            assert code_of(sock, "containerd.task.v4.Task", "State", api.StateRequest(id=cid)) == Code.UNIMPLEMENTED

            if cgroup is not None and stdin_form != "none":  # the options reached the server
                assert f":{cgroup}\n" in Path(f"/proc/{pid}/cgroup").read_text()
            asyncio.run(call(sock, "containerd.task.v3.Task", "Shutdown", api.ShutdownRequest(id=cid)))
            assert gone(pid, 10), "the server did not exit after Shutdown with no containers"
            assert not os.path.exists(sock), "the server left its socket behind"
            pid = None
        finally:
            if pid is not None:
                kill_and_reap(pid)
            if sock:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock)
    logged = os.read(log_reader, 1 << 20).decode(errors="replace")
    assert "pyrunc shim serving" in logged
    assert "ignoring runtime options" not in logged
    if stdin_form == "bootstrap":
        assert "level=debug" in logged  # LOG_LEVEL_DEBUG in BootstrapParams turned on debug logs


# -- the Go shim as the oracle --------------------------------------------------------------------

def go_shim_or_skip() -> str:
    import shutil

    path = shutil.which(GO_SHIM)
    if path is None:
        pytest.skip(f"{GO_SHIM} is not installed")
    return path


def test_version_layout_matches_the_go_shim() -> None:
    go = subprocess.run([go_shim_or_skip(), "-v"], capture_output=True, text=True, timeout=30)
    ours = subprocess.run([shim_binary(), "-v"], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PATH=PATH))
    assert go.returncode == ours.returncode == 0 and go.stderr == ours.stderr == ""
    go_lines, our_lines = go.stdout.split("\n"), ours.stdout.split("\n")
    assert len(go_lines) == len(our_lines) == 6  # four lines, an empty one, and the final newline
    # 1.6 prints its argv[0] as given, 2.x its base name; ours is always the base name
    assert (os.path.basename(go_lines[0]), our_lines[0]) == (f"{GO_SHIM}:", "containerd-shim-pyrunc-v2:")
    for prefix, go_line, our_line in zip(["  Version:  ", "  Revision: "], go_lines[1:3], our_lines[1:3],
                                         strict=True):
        assert go_line.startswith(prefix) and our_line.startswith(prefix)
    assert go_lines[3].startswith("  Go version: ") and our_lines[3].startswith("  Python version: ")
    assert go_lines[4:] == our_lines[4:] == ["", ""]


def test_info_against_the_go_shim() -> None:
    """With a Go shim that has -info (2.0+), the two RuntimeInfos agree but for name and version.
    Debian's 1.6 Go shim has none: it refuses the flag, so there is nothing to compare with."""
    options = any_pb2.Any(type_url="containerd.runc.v1.Options",
                          value=options_pb2.Options(binary_name="runc").SerializeToString()).SerializeToString()
    go = subprocess.run([go_shim_or_skip(), "-info"], input=options, capture_output=True, timeout=30)
    ours = subprocess.run([shim_binary(), "-info"], input=options, capture_output=True, timeout=30,
                          env=dict(os.environ, PATH=PATH))
    assert (ours.returncode, ours.stderr) == (0, b"")
    mine = introspection_pb2.RuntimeInfo.FromString(ours.stdout)
    if go.returncode == 2 and b"flag provided but not defined: -info" in go.stderr:
        pytest.skip(f"this {GO_SHIM} predates -info (containerd 2.0): no oracle for it")
    assert go.returncode == 0, go.stderr
    theirs = introspection_pb2.RuntimeInfo.FromString(go.stdout)
    assert mine.options == theirs.options
    assert mine.features.type_url == theirs.features.type_url
    assert json.loads(mine.features.value) == json.loads(theirs.features.value)


def test_plain_start_address_matches_the_go_shim(containerd, bundle) -> None:
    """containerd 1.6 (no MAX_SHIM_VERSION, options Any on stdin): both print the same plain address for
    the same container. Run one after the other, as they would fight over the one group socket."""
    go = go_shim_or_skip()
    cid, path, _ = bundle
    options = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"").SerializeToString()
    answers = {}
    with subreaper():
        for name, binary in (("go", go), ("ours", shim_binary())):
            r = run_start(containerd, cid, path, {}, options, binary=binary)
            assert (r.returncode, r.stderr) == (0, b""), (name, r)
            answers[name] = r.stdout
            sock = r.stdout.decode().removeprefix("unix://")
            # start has exited: what still names the container is its server (ours is start's fork)
            servers = [int(p) for p in os.listdir("/proc") if p.isdigit() and cid.encode() in _cmdline(int(p))]
            assert servers, f"no {name} server found"
            for pid in servers:
                kill_and_reap(pid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)
    assert answers["go"] == answers["ours"] == \
        cli.socket_address(containerd.address, containerd.namespace, cid).encode()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
