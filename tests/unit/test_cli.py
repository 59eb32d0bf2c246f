"""The containerd-shim-pyrunc-v2 command line: flags, start, delete — no containerd needed."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from shim import cli
from shim.api.containerd.task.v2 import shim_pb2

ROOT = Path(__file__).resolve().parents[2]
CONTAINERD_SOCK = "/run/containerd/containerd.sock"
BASE = ["-namespace", "ns1", "-address", CONTAINERD_SOCK, "-publish-binary", "/usr/bin/containerd"]


# -- flags ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["-namespace", "ns1", "-id", "c1", "-address", "/a.sock", "-publish-binary", "/bin/ctrd", "-debug", "start"],
    ["--namespace", "ns1", "--id", "c1", "--address", "/a.sock", "--publish-binary", "/bin/ctrd", "--debug", "start"],
    ["-namespace=ns1", "--id=c1", "-address=/a.sock", "--publish-binary=/bin/ctrd", "-debug=true", "start"],
    ["-debug", "-namespace", "ns1", "-id", "c1", "-address", "/a.sock", "-publish-binary", "/bin/ctrd", "start",
     "-bundle", "/ignored", "--extra=1", "more"],
])
def test_flag_styles(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    args = cli.parse_args(argv)
    assert (args.namespace, args.id, args.address, args.publish_binary, args.debug, args.action) == \
        ("ns1", "c1", "/a.sock", "/bin/ctrd", True, "start")
    assert args.bundle == str(tmp_path)  # the working directory, unless -bundle comes before the action
    assert not args.version and not args.info and args.socket_path == ""


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TTRPC_ADDRESS", "/run/containerd/containerd.sock.ttrpc")
    monkeypatch.setenv("GRPC_ADDRESS", "/run/containerd/containerd.sock")
    args = cli.parse_args(["-bundle", str(tmp_path), "delete"])
    assert args.ttrpc_address == "/run/containerd/containerd.sock.ttrpc"
    assert args.grpc_address == "/run/containerd/containerd.sock"
    assert (args.bundle, args.action, args.publish_binary, args.debug) == (str(tmp_path), "delete", "containerd", False)
    monkeypatch.delenv("TTRPC_ADDRESS")
    assert cli.parse_args([]).ttrpc_address == ""
    assert cli.parse_args([]).action is None


@pytest.mark.parametrize(("argv", "debug", "version", "info", "action"), [
    (["-debug=false", "start"], False, False, False, "start"),
    (["-debug=0", "-debug=T"], True, False, False, None),
    (["-v"], False, True, False, None),
    (["--version"], False, True, False, None),
    (["-info"], False, False, True, None),
    (["-debug", "--", "-v"], True, False, False, "-v"),  # after "--" everything is positional
    (["-", "start"], False, False, False, "-"),  # a lone dash is a word, as in Go
])
def test_bool_flags(argv: list[str], debug: bool, version: bool, info: bool, action: str | None) -> None:
    args = cli.parse_args(argv)
    assert (args.debug, args.version, args.info, args.action) == (debug, version, info, action)


def test_string_flag_takes_next_word_even_with_a_dash() -> None:
    assert cli.parse_args(["-id", "-debug", "start"]).id == "-debug"


@pytest.mark.parametrize(("argv", "message"), [
    (["-bogus", "start"], "flag provided but not defined: -bogus"),
    (["--runtime-info", "start"], "flag provided but not defined: -runtime-info"),
    (["-id"], "flag needs an argument: -id"),
    (["-debug=maybe", "start"], 'invalid boolean value "maybe" for -debug'),
    (["---id", "x", "start"], "bad flag syntax: ---id"),
    (["-=x", "start"], "bad flag syntax: -=x"),
])
def test_bad_flags_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(cli.UsageError, match=message):
        cli.parse_args(argv)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(message) and "Usage of containerd-shim-pyrunc-v2" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-h"]) == 0
    assert "Usage of containerd-shim-pyrunc-v2" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-v"]) == 0
    out, err = capsys.readouterr()
    major, minor, micro = sys.version_info[:3]
    lines = out.split("\n")
    assert lines[0] == "containerd-shim-pyrunc-v2:"
    assert lines[1].startswith("  Version:  ") and lines[1].removeprefix("  Version:  ")[0].isdigit()
    assert lines[2] == f"  Revision: {cli._revision()}"
    assert lines[3:] == [f"  Python version: {major}.{minor}.{micro}", "", ""]  # Go's layout: a blank line last
    assert err == ""


def test_revision_is_the_checkouts_commit() -> None:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    assert cli._revision() == r.stdout.strip()


@pytest.mark.parametrize("layout", ["loose", "packed", "detached", "worktree", "none"])
def test_revision_from_git_layouts(layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shim

    top = tmp_path / "checkout"
    (top / "shim").mkdir(parents=True)
    monkeypatch.setattr(shim, "__file__", str(top / "shim" / "__init__.py"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    git = top / ".git"
    if layout == "none":
        assert cli._revision() == ""
        return
    if layout == "worktree":  # .git is a file; branches live in the main repository's common dir
        main = tmp_path / "main.git"
        git = main / "worktrees" / "checkout"
        git.mkdir(parents=True)
        (top / ".git").write_text(f"gitdir: {git}\n")
        (git / "commondir").write_text("../..\n")
        (main / "refs" / "heads").mkdir(parents=True)
        (main / "refs" / "heads" / "topic").write_text(commit + "\n")
    else:
        (git / "refs" / "heads").mkdir(parents=True)
    if layout == "loose":
        (git / "refs" / "heads" / "topic").write_text(commit + "\n")
    elif layout == "packed":
        (git / "packed-refs").write_text(f"# pack-refs with: peeled fully-peeled sorted\n{commit} refs/heads/topic\n")
    (git / "HEAD").write_text(commit + "\n" if layout == "detached" else "ref: refs/heads/topic\n")
    assert cli._revision() == commit


def test_version_through_python_m() -> None:
    r = subprocess.run([sys.executable, "-m", "shim", "-version"], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("containerd-shim-pyrunc-v2:\n  Version:  "), r


@pytest.mark.parametrize(("argv", "message"), [
    (BASE + ["-id", "c1"], "missing action"),
    (BASE + ["-id", "c1", "serve"], "unknown action 'serve'"),
    (["-id", "c1", "start"], "namespace cannot be empty"),
    (BASE + ["delete"], "id cannot be empty"),
])
def test_errors_exit_1(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("containerd-shim-pyrunc-v2: ") and message in err


def test_shim_args_compare_and_print(tmp_path: Path) -> None:
    a = cli.ShimArgs(namespace="n", id="x", bundle=str(tmp_path), ttrpc_address="t", grpc_address="")
    b = cli.ShimArgs(namespace="n", id="x", bundle=str(tmp_path), ttrpc_address="t", grpc_address="")
    assert a == b and "namespace='n'" in repr(a)
    b.socket_path = "/s"
    assert a != b


# -- group and socket address ---------------------------------------------------------------------

def write_config(bundle: Path, annotations: dict[str, object] | None) -> None:
    spec: dict[str, object] = {"ociVersion": "1.0.2", "process": {"args": ["io.kubernetes.cri.sandbox-id"]}}
    if annotations is not None:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))


@pytest.mark.parametrize(("annotations", "group"), [
    (None, "c1"),
    ({}, "c1"),
    ({"other": "x"}, "c1"),
    ({"io.kubernetes.cri.sandbox-id": "pod1"}, "pod1"),
    ({"io.containerd.runc.v2.group": "g1"}, "g1"),
    ({"io.kubernetes.cri.sandbox-id": "pod1", "io.containerd.runc.v2.group": "g1"}, "g1"),
])
def test_group_id(tmp_path: Path, annotations: dict[str, object] | None, group: str) -> None:
    write_config(tmp_path, annotations)
    assert cli.group_id(str(tmp_path), "c1") == group


def test_group_id_needs_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cli.group_id(str(tmp_path), "c1")
    (tmp_path / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-id": 3}}')
    with pytest.raises(cli.ShimError, match="not a string"):
        cli.group_id(str(tmp_path), "c1")
    (tmp_path / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-id": "p"')
    with pytest.raises(ValueError):
        cli.group_id(str(tmp_path), "c1")


def test_socket_address_is_containerds() -> None:
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()
    assert cli.socket_address(CONTAINERD_SOCK, "k8s.io", "pod1") == f"unix:///run/containerd/s/{digest}"
    assert cli.socket_address(CONTAINERD_SOCK, "k8s.io", "pod1", socket_dir="/tmp/x") == f"unix:///tmp/x/{digest}"
    # filepath.Join cleans: these name the same socket as above
    for address in ("/run/containerd/containerd.sock/", "//run//containerd/./containerd.sock"):
        assert cli.socket_address(address, "k8s.io", "pod1").endswith(digest)


@pytest.mark.parametrize(("parts", "joined"), [  # Go's own examples for filepath.Join and Clean
    (("a", "b", "c"), "a/b/c"),
    (("a", "b/c"), "a/b/c"),
    (("a/b", "c"), "a/b/c"),
    (("a/b", "/c"), "a/b/c"),
    (("a/b", "../../../xyz"), "../xyz"),
    (("", ""), ""),
    (("a", ""), "a"),
    (("", "a"), "a"),
    (("//abc//def//ghi",), "/abc/def/ghi"),
    (("/../abc",), "/abc"),
    (("abc/def/../../..",), ".."),
    (("/", "ns", "g"), "/ns/g"),
])
def test_go_path_join(parts: tuple[str, ...], joined: str) -> None:
    assert cli.go_path_join(*parts) == joined


# -- start ----------------------------------------------------------------------------------------

@pytest.fixture
def sockdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A socket dir short enough for sun_path (pytest's tmp_path is not), not yet created."""
    base = tempfile.mkdtemp(prefix="pyrunc-", dir="/tmp")
    path = os.path.join(base, "s")
    monkeypatch.setattr(cli, "SOCKET_DIR", path)
    yield path
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "c1"
    path.mkdir()
    write_config(path, None)
    return path


@pytest.fixture
def stdin(monkeypatch: pytest.MonkeyPatch) -> io.BytesIO:
    data = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(data))
    return data


def no_fork() -> int:
    raise AssertionError("start forked")


def start_argv(bundle: Path, cid: str = "c1") -> list[str]:
    return BASE + ["-id", cid, "-bundle", str(bundle), "start"]


def test_start_reuses_a_live_socket(sockdir: str, bundle: Path, stdin: io.BytesIO,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(bundle, {"io.kubernetes.cri.sandbox-id": "pod1"})
    address = cli.socket_address(CONTAINERD_SOCK, "ns1", "pod1")
    os.makedirs(sockdir, mode=0o700)
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(address.removeprefix("unix://"))
        live.listen()
        monkeypatch.setattr(os, "fork", no_fork)
        assert cli.main(start_argv(bundle)) == 0
    assert capsys.readouterr() == (address, "")
    assert (bundle / "address").read_text() == address
    assert not (bundle / ".address").exists()


def test_start_replaces_a_dead_socket(sockdir: str, bundle: Path, stdin: io.BytesIO,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    address = cli.socket_address(CONTAINERD_SOCK, "ns1", "c1")
    path = address.removeprefix("unix://")
    os.makedirs(sockdir, mode=0o700)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)  # closed without unlinking, as by a shim that crashed
    os.chmod(path, 0o644)  # to tell it from the new one (inode numbers are reused)
    monkeypatch.setattr(os, "fork", lambda: 2**22 + 1)  # "the parent", of a child that does not exist
    adjusted: list[int] = []
    monkeypatch.setattr(cli, "_adjust_oom_score", adjusted.append)
    assert cli.main(start_argv(bundle)) == 0
    assert capsys.readouterr() == (address, "")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (bundle / "address").read_text() == address
    assert adjusted == [2**22 + 1]


def test_start_waits_for_a_socket_between_bind_and_listen(sockdir: str, bundle: Path, stdin: io.BytesIO,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Another start that has bound the group's socket but not listened yet holds the directory's lock:
    this one waits, then finds the socket alive, instead of replacing it as dead."""
    address = cli.socket_address(CONTAINERD_SOCK, "ns1", "c1")
    os.makedirs(sockdir, mode=0o700)
    lock = os.open(sockdir, os.O_RDONLY | os.O_DIRECTORY)
    results: list[int] = []
    with socket.socket(socket.AF_UNIX) as other:
        fcntl.flock(lock, fcntl.LOCK_EX)
        other.bind(address.removeprefix("unix://"))
        monkeypatch.setattr(os, "fork", no_fork)
        waiter = threading.Thread(target=lambda: results.append(cli.main(start_argv(bundle))))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive(), "start did not wait for the lock"
        other.listen()
        os.close(lock)
        waiter.join(10)
    assert results == [0]
    assert capsys.readouterr() == (address, "")


def test_start_creates_the_socket_dir_for_root_only(sockdir: str, bundle: Path, stdin: io.BytesIO,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fork", lambda: 2**22 + 1)
    monkeypatch.setattr(cli, "_adjust_oom_score", lambda pid: None)
    assert cli.main(start_argv(bundle)) == 0
    assert stat.S_IMODE(os.stat(sockdir).st_mode) == 0o700


def test_start_failure_removes_the_socket(sockdir: str, bundle: Path, stdin: io.BytesIO,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", fork)
    assert cli.main(start_argv(bundle)) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("containerd-shim-pyrunc-v2: start: ") and "Resource temporarily" in err
    assert os.listdir(sockdir) == []


def test_start_refuses_a_socket_path_too_long(bundle: Path, stdin: io.BytesIO, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "SOCKET_DIR", "/tmp/" + "d" * 40)
    assert cli.main(start_argv(bundle)) == 1
    out, err = capsys.readouterr()
    assert out == "" and "longer than 107 bytes" in err
    assert not os.path.exists("/tmp/" + "d" * 40)


def test_start_without_config_fails_clearly(sockdir: str, tmp_path: Path, stdin: io.BytesIO,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(start_argv(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert out == "" and "config.json" in err


# A start whose server is a stand-in: it records what it was given and how it runs, then waits.
FAKE_SERVE = textwrap.dedent("""
    import json, os, socket, sys, time, types

    record, sockdir = sys.argv[1], sys.argv[2]

    def serve(args, listener, options, go_ahead=None):
        info = {
            "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "cwd": os.getcwd(),
            "stdio": [os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)],
            "options": options.hex(), "family": int(listener.family),
            "accepting": listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
            "sockname": listener.getsockname(), "socket_path": args.socket_path,
            "args": [args.namespace, args.id, args.address, args.publish_binary, args.ttrpc_address, args.debug],
        }
        with open(record + ".tmp", "w") as f:
            json.dump(info, f)
        os.rename(record + ".tmp", record)
        if os.environ.get("FAKE_SERVE_RAISE"):
            raise RuntimeError("boom")
        time.sleep(60)
        return 0

    module = types.ModuleType("shim.serve")
    module.serve = serve
    sys.modules["shim.serve"] = module
    if os.environ.get("FAKE_NO_FORK"):
        def no_fork():
            raise RuntimeError("start forked")
        os.fork = no_fork
    import shim.cli
    shim.cli.SOCKET_DIR = sockdir
    sys.exit(shim.cli.main(sys.argv[3:]))
""")

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """The forked server outlives start; as subreaper we get it as a child and can reap it (this
    container's init does not reap orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int()
    assert libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) == 0
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_start_forks_a_detached_server(sockdir: str, bundle: Path, tmp_path: Path) -> None:
    record = tmp_path / "served.json"
    env = dict(os.environ, TTRPC_ADDRESS=CONTAINERD_SOCK + ".ttrpc", PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-c", FAKE_SERVE, str(record), sockdir, *BASE, "-id", "c1", "start"]
    options = b"\n\x03abc\x12\x01z"  # raw bytes, passed through unparsed
    address = cli.socket_address(CONTAINERD_SOCK, "ns1", "c1")
    info: dict[str, object] = {}
    with subreaper():
        try:
            start = subprocess.Popen(argv, cwd=bundle, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
            # Read to EOF, as containerd 1.6 does: this would hang if the server kept stdout or stderr.
            out, err = start.communicate(options, timeout=20)
            assert (start.returncode, out, err) == (0, address.encode(), b"")
            wait_for(record)
            info = json.loads(record.read_text())
            pid = info["pid"]
            assert isinstance(pid, int)
            assert info["sid"] == info["pgid"] == pid != start.pid  # its own session
            assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # alive, and reparented to us: start is gone
            assert info["stdio"] == ["/dev/null"] * 3
            assert info["cwd"] == str(bundle)
            assert info["options"] == options.hex()
            path = address.removeprefix("unix://")
            assert (info["family"], info["accepting"], info["sockname"], info["socket_path"]) == \
                (socket.AF_UNIX, 1, path, path)
            assert info["args"] == ["ns1", "c1", CONTAINERD_SOCK, "/usr/bin/containerd", CONTAINERD_SOCK + ".ttrpc",
                                    False]
            assert (bundle / "address").read_text() == address
            own = int(Path("/proc/self/oom_score_adj").read_text())
            assert int(Path(f"/proc/{pid}/oom_score_adj").read_text()) == min(own + 1, 1000)

            # A second start for the same group finds the server alive: same address, no new server.
            (bundle / "address").unlink()
            again = subprocess.run(argv, cwd=bundle, env=dict(env, FAKE_NO_FORK="1"), input=b"",
                                   capture_output=True, timeout=20)
            assert (again.returncode, again.stdout, again.stderr) == (0, address.encode(), b"")
            assert (bundle / "address").read_text() == address
        finally:
            pid = info.get("pid")
            if isinstance(pid, int):
                kill_and_reap(pid)


def test_a_failing_server_exits_and_logs(sockdir: str, bundle: Path, tmp_path: Path) -> None:
    """A server that raises still ends in os._exit (never back in start's code), and says why in the log."""
    os.mkfifo(bundle / "log")
    reader = os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)  # as containerd holds it
    record = tmp_path / "served.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_SERVE_RAISE="1")
    argv = [sys.executable, "-c", FAKE_SERVE, str(record), sockdir, *BASE, "-id", "c1", "-bundle", str(bundle),
            "start"]
    try:
        with subreaper():
            r = subprocess.run(argv, env=env, input=b"", capture_output=True, timeout=20)
            assert (r.returncode, r.stdout) == (0, cli.socket_address(CONTAINERD_SOCK, "ns1", "c1").encode())
            wait_for(record)
            _, status = os.waitpid(json.loads(record.read_text())["pid"], 0)
        assert os.waitstatus_to_exitcode(status) == 1
        logged = os.read(reader, 65536).decode()
    finally:
        os.close(reader)
    assert 'level=error msg="shim server failed" error="Traceback' in logged
    assert 'RuntimeError: boom' in logged and logged.count("\n") == 1


# -- -info ----------------------------------------------------------------------------------------

FEATURES = {"ociVersionMin": "1.0.0", "ociVersionMax": "1.1.0", "hooks": ["prestart", "poststop"],
            "mountOptions": ["bind", "ro"], "linux": {"namespaces": ["pid", "mount"], "seccomp": {"enabled": True}},
            "annotations": {"org.opencontainers.runc.version": "1.1.5"}, "unknownKey": "\u00e9"}
FAKE_FEATURES_RUNC = """#!/bin/sh
[ "$1" = features ] || exit 9
echo "$0 $*" >> "$(dirname "$0")/calls"
[ -n "$FAKE_FEATURES_FAIL" ] && { echo 'unknown command "features"' >&2; exit 1; }
cat "$(dirname "$0")/features.json"
"""


@pytest.fixture
def features_runc(tmp_path: Path) -> Path:
    path = tmp_path / "rt" / "runc"
    path.parent.mkdir()
    path.write_text(FAKE_FEATURES_RUNC)
    path.chmod(0o755)
    (path.parent / "features.json").write_text(json.dumps(FEATURES, indent=4))  # runc indents
    return path


def runtime_info(stdin: io.BytesIO, data: bytes, capsysbinary: pytest.CaptureFixture[bytes]):
    from shim.api.containerd.types import introspection_pb2

    stdin.write(data)
    stdin.seek(0)
    assert cli.main(["-info"]) == 0
    out, err = capsysbinary.readouterr()
    assert err == b""
    return introspection_pb2.RuntimeInfo.FromString(out)


def runc_options_any(**fields: object):
    from google.protobuf import any_pb2

    from shim.api.containerd.runc.v1 import options_pb2

    return any_pb2.Any(type_url="containerd.runc.v1.Options", value=options_pb2.Options(**fields).SerializeToString())


def test_info_with_runc_options(stdin: io.BytesIO, features_runc: Path,
                                capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    given = runc_options_any(binary_name=str(features_runc), systemd_cgroup=True)
    info = runtime_info(stdin, given.SerializeToString(), capsysbinary)
    assert info.name == "io.containerd.pyrunc.v2"
    assert (info.version.version, info.version.revision) == (cli._version(), cli._revision())
    assert info.options == given  # echoed
    assert info.features.type_url == "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    assert json.loads(info.features.value) == FEATURES
    assert b" " not in info.features.value and "\u00e9".encode() in info.features.value  # compact, UTF-8
    assert not info.annotations
    assert (features_runc.parent / "calls").read_text() == f"{features_runc} features\n"


def test_info_echoes_options_under_their_bare_type_name(stdin: io.BytesIO, features_runc: Path,
                                                        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    given = runc_options_any(binary_name=str(features_runc))
    given.type_url = "type.googleapis.com/containerd.runc.v1.Options"
    info = runtime_info(stdin, given.SerializeToString(), capsysbinary)
    assert (info.options.type_url, info.options.value) == ("containerd.runc.v1.Options", given.value)


def test_info_with_a_runtime_config_file(stdin: io.BytesIO, features_runc: Path, tmp_path: Path,
                                         capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from google.protobuf import any_pb2

    from shim.api.runtimeoptions.v1 import api_pb2

    config = tmp_path / "pyrunc.toml"
    config.write_text(f'binary_name = "{features_runc}"\n')
    given = any_pb2.Any(type_url="runtimeoptions.v1.Options",
                        value=api_pb2.Options(config_path=str(config)).SerializeToString())
    info = runtime_info(stdin, given.SerializeToString(), capsysbinary)
    assert info.options == given
    assert json.loads(info.features.value) == FEATURES  # the configured binary was asked


def test_info_without_options_asks_runc_on_path(stdin: io.BytesIO, features_runc: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    monkeypatch.setenv("PATH", f"{features_runc.parent}:{os.environ['PATH']}")
    info = runtime_info(stdin, b"", capsysbinary)
    assert not info.HasField("options")
    assert json.loads(info.features.value) == FEATURES


@pytest.mark.parametrize("output", ["fail", "not json", "[1, 2]"])
def test_info_without_features_still_answers(output: str, stdin: io.BytesIO, features_runc: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """A runtime without `features` (runc < 1.1, youki) is no error, as with the Go shim: no features."""
    if output == "fail":
        monkeypatch.setenv("FAKE_FEATURES_FAIL", "1")
    else:
        (features_runc.parent / "features.json").write_text(output)
    info = runtime_info(stdin, runc_options_any(binary_name=str(features_runc)).SerializeToString(), capsysbinary)
    assert info.name == "io.containerd.pyrunc.v2" and not info.HasField("features")


def test_info_with_the_real_runc(stdin: io.BytesIO, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed")
    features = subprocess.run([runc, "features"], capture_output=True)
    info = runtime_info(stdin, b"", capsysbinary)
    if features.returncode != 0:
        assert not info.HasField("features")
    else:
        assert json.loads(info.features.value) == json.loads(features.stdout)


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff\xff", "not a protobuf Any"),
    (b"\n\x0bsome.Type.X", "unsupported runtime options type 'some.Type.X'"),
    (b"\n\x1acontainerd.runc.v1.Options\x12\x02\x0f\x00", "invalid runtime options containerd.runc.v1.Options"),
])
def test_info_refuses_bad_options(data: bytes, message: str, stdin: io.BytesIO,
                                  capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    stdin.write(data)
    stdin.seek(0)
    assert cli.main(["-info"]) == 1
    out, err = capsysbinary.readouterr()
    assert out == b"" and message in err.decode() and err.startswith(b"containerd-shim-pyrunc-v2: ")


def test_info_without_the_runtime_binary(stdin: io.BytesIO, tmp_path: Path,
                                         capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    stdin.write(runc_options_any(binary_name="no-such-runc").SerializeToString())
    stdin.seek(0)
    assert cli.main(["-info"]) == 1
    out, err = capsysbinary.readouterr()
    assert out == b"" and b'failed to look up the path of "no-such-runc"' in err


def test_info_through_the_binary(tmp_path: Path, features_runc: Path) -> None:
    """As containerd runs it: only -info, stdin the options, stdout the protobuf, exit 0."""
    from shim.api.containerd.types import introspection_pb2

    r = subprocess.run([sys.executable, "-m", "shim", "-info"], cwd=ROOT, capture_output=True, timeout=30,
                       input=runc_options_any(binary_name=str(features_runc)).SerializeToString())
    assert (r.returncode, r.stderr) == (0, b"")
    assert json.loads(introspection_pb2.RuntimeInfo.FromString(r.stdout).features.value) == FEATURES


# -- delete ---------------------------------------------------------------------------------------

FAKE_RUNC = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/runc.argv"
grep SigIgn /proc/self/status > "$(dirname "$0")/runc.sigign"
[ -n "$FAKE_RUNC_OUTPUT" ] && echo "$FAKE_RUNC_OUTPUT" >&2
exit "${FAKE_RUNC_STATUS:-0}"
"""


@pytest.fixture
def fake_runc(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "runc"
    path.parent.mkdir()
    path.write_text(FAKE_RUNC)
    path.chmod(0o755)
    return path


@pytest.fixture
def runc_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """runc's state directory for c1 under a default root of our own: delete runs runc only while it exists."""
    root = tmp_path / "runc-default"
    monkeypatch.setattr(cli, "DEFAULT_RUNC_ROOT", str(root))
    (root / "ns1" / "c1").mkdir(parents=True)
    return root / "ns1"


def test_default_runc_root_is_the_go_shims() -> None:
    assert cli.DEFAULT_RUNC_ROOT == "/run/containerd/runc"  # containerd's process.RuncRoot


def delete_argv(bundle: Path, *flags: str) -> list[str]:
    return BASE + list(flags) + ["-id", "c1", "-bundle", str(bundle), "delete"]


def run_delete(bundle: Path, capsysbinary: pytest.CaptureFixture[bytes], *flags: str
               ) -> tuple[shim_pb2.DeleteResponse, bytes, str]:
    before = time.time_ns()
    assert cli.main(delete_argv(bundle, *flags)) == 0
    after = time.time_ns()
    out, err = capsysbinary.readouterr()
    response = shim_pb2.DeleteResponse.FromString(out)
    assert before <= response.exited_at.ToNanoseconds() <= after
    return response, out, err.decode()


def test_delete_with_saved_options(bundle: Path, fake_runc: Path, tmp_path: Path,
                                   capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    (bundle / "options.json").write_text(json.dumps({
        "binary_name": str(fake_runc), "root": str(tmp_path / "runc-root"), "systemd_cgroup": True,
        "no_pivot_root": False, "shim_cgroup": "", "io_uid": 0}))
    (tmp_path / "runc-root" / "ns1" / "c1").mkdir(parents=True)
    (bundle / "init.pid").write_text("4321")
    (bundle / "init.exit").write_text("3")
    response, out, err = run_delete(bundle, capsysbinary)
    assert (response.pid, response.exit_status, err) == (4321, 3, "")
    assert out == shim_pb2.DeleteResponse(pid=4321, exit_status=3, exited_at=response.exited_at).SerializeToString()
    assert (fake_runc.parent / "runc.argv").read_text().splitlines() == [
        "--root", str(tmp_path / "runc-root" / "ns1"), "--log", str(bundle / "log.json"), "--log-format", "json",
        "--systemd-cgroup", "delete", "--force", "c1"]


def test_delete_defaults(bundle: Path, fake_runc: Path, runc_state: Path, monkeypatch: pytest.MonkeyPatch,
                         capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    monkeypatch.setenv("PATH", f"{fake_runc.parent}:{os.environ['PATH']}")
    response, out, err = run_delete(bundle, capsysbinary)
    assert (response.pid, response.exit_status, err) == (0, 137, "")  # nothing known: reported as killed
    assert out == shim_pb2.DeleteResponse(exit_status=137, exited_at=response.exited_at).SerializeToString()
    assert (fake_runc.parent / "runc.argv").read_text().splitlines() == [
        "--root", str(runc_state), "--log", str(bundle / "log.json"), "--log-format", "json",
        "delete", "--force", "c1"]
    # runc gets SIGPIPE back at its default, not Python's "ignored"
    sigign = int((fake_runc.parent / "runc.sigign").read_text().split()[1], 16)
    assert not sigign & (1 << (signal.SIGPIPE - 1))


def test_delete_removes_a_dead_servers_socket_but_not_a_live_one(bundle: Path, fake_runc: Path,
                                                               capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(fake_runc)}))
    sockdir = Path(tempfile.mkdtemp(prefix="dl-", dir="/tmp"))
    try:
        dead, live = sockdir / "dead", sockdir / "live"
        socket.socket(socket.AF_UNIX).bind(str(dead))  # bound, never listening: what a killed shim leaves
        (bundle / "address").write_text(f"unix://{dead}")
        run_delete(bundle, capsysbinary)
        assert not dead.exists()
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(live))
            server.listen()
            (bundle / "address").write_text(f"unix://{live}")
            run_delete(bundle, capsysbinary)
            assert live.exists(), "a group's shim still serves other containers on it"
    finally:
        shutil.rmtree(sockdir)


def test_delete_ignores_a_container_runc_does_not_know(bundle: Path, fake_runc: Path, runc_state: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(fake_runc)}))
    monkeypatch.setenv("FAKE_RUNC_STATUS", "1")
    monkeypatch.setenv("FAKE_RUNC_OUTPUT", 'container "c1" does not exist')
    _, _, err = run_delete(bundle, capsysbinary)
    assert err == ""
    _, _, err = run_delete(bundle, capsysbinary, "-debug")
    assert "level=debug" in err and "does not exist" in err


def test_delete_warns_on_other_failures(bundle: Path, fake_runc: Path, runc_state: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(fake_runc)}))
    (bundle / "init.pid").write_text("not a pid")
    monkeypatch.setenv("FAKE_RUNC_STATUS", "1")
    monkeypatch.setenv("FAKE_RUNC_OUTPUT", "permission denied")
    response, _, err = run_delete(bundle, capsysbinary)
    assert response.pid == 0 and response.exit_status == 137
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith('time="') for line in lines)
    assert 'level=warning msg="failed to remove runc container" error="permission denied"' in lines[0]
    assert 'level=warning msg="failed to read init.pid"' in lines[1]


def test_delete_without_runc_still_answers(bundle: Path, runc_state: Path,
                                          capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(bundle / "no-such-runc")}))
    (bundle / "init.exit").write_text("0\n")
    response, _, err = run_delete(bundle, capsysbinary)
    assert response.exit_status == 0 and "failed to remove runc container" in err


def test_delete_with_unreadable_options_uses_defaults(bundle: Path, fake_runc: Path, runc_state: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    monkeypatch.setenv("PATH", f"{fake_runc.parent}:{os.environ['PATH']}")
    (bundle / "options.json").write_text("{")
    _, _, err = run_delete(bundle, capsysbinary)
    assert "failed to read options.json" in err
    assert (fake_runc.parent / "runc.argv").read_text().splitlines()[:2] == ["--root", str(runc_state)]


def test_delete_skips_runc_when_its_state_is_gone(bundle: Path, fake_runc: Path, runc_state: Path,
                                                  capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(fake_runc)}))
    (runc_state / "c1").rmdir()  # runc delete --force would only have found nothing
    (bundle / "init.exit").write_text("5")
    response, _, err = run_delete(bundle, capsysbinary)
    assert response.exit_status == 5 and err == ""
    assert not (fake_runc.parent / "runc.argv").exists()
    _, _, err = run_delete(bundle, capsysbinary, "-debug")
    assert 'level=debug msg="runc container already gone"' in err
    (runc_state / "c1").mkdir()  # a state dir without state.json (an aborted create): runc removes it
    run_delete(bundle, capsysbinary)
    assert (fake_runc.parent / "runc.argv").read_text().splitlines()[-3:] == ["delete", "--force", "c1"]


def mount_tmpfs(path: Path) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here: {r.stderr.decode().strip()}")


def test_delete_unmounts_a_stacked_rootfs(bundle: Path, fake_runc: Path,
                                          capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(fake_runc)}))
    rootfs = bundle / "rootfs"
    rootfs.mkdir()
    try:
        mount_tmpfs(rootfs)
        mount_tmpfs(rootfs)
        assert cli._maybe_mounted(str(rootfs))
        _, _, err = run_delete(bundle, capsysbinary)
        assert err == ""
        assert not cli._maybe_mounted(str(rootfs)) and not os.path.ismount(rootfs)
    finally:
        while os.path.ismount(rootfs):
            subprocess.run(["umount", "-l", str(rootfs)], check=True)


def test_maybe_mounted(tmp_path: Path) -> None:
    assert not cli._maybe_mounted(str(tmp_path / "missing"))
    assert not cli._maybe_mounted(str(tmp_path))
    assert cli._maybe_mounted("/proc")


def test_run_captures_output_and_status() -> None:
    assert cli.run(["sh", "-c", "echo out; echo err >&2; read x || exit 7"]) == (7, b"out\nerr\n")
    with pytest.raises(FileNotFoundError):
        cli.run(["/no/such/binary"])


# -- hand-made wire formats -----------------------------------------------------------------------

@pytest.mark.parametrize(("pid", "status", "seconds", "nanos"), [
    (0, 0, 0, 0),
    (1, 137, 1_700_000_000, 123_456_789),
    (4_194_304, 0, 1_700_000_000, 0),
    (0, 255, 0, 999_999_999),
    (2**32 - 1, 2**32 - 1, 2**63 - 1, 2**31 - 1),
    (127, 128, 2**35, 1),
    (300, 16_384, -62_135_596_800, 0),  # Go's zero time
    (1, 1, -1, -1),
])
def test_delete_response_matches_protobuf(pid: int, status: int, seconds: int, nanos: int) -> None:
    expected = shim_pb2.DeleteResponse(pid=pid, exit_status=status,
                                       exited_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    assert cli.encode_delete_response(pid, status, seconds, nanos) == expected.SerializeToString()


@pytest.mark.parametrize("text", [
    '{"a": 1, "b": [true, false, null], "c": {"d": "\\u00e9\\n"}, "e": -1.5e3}',
    '  \n{"binary_name": "", "root": "/run/x", "systemd_cgroup": false}\n',
    "[]", '"s"', "0",
])
def test_parse_json_is_json_loads(text: str) -> None:
    assert cli.parse_json(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"a": }', "{} {}", "[1,]", "nul"])
def test_parse_json_rejects_what_json_loads_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        cli.parse_json(text.encode())


def test_import_stays_light() -> None:
    """start and delete are on containerd's hot path: importing the CLI loads none of the heavy modules."""
    # Only what shim.cli itself pulls in counts: an editable install's path hook may import re first.
    code = ("import sys; before = set(sys.modules); import shim.cli; new = set(sys.modules) - before; "
            "print(' '.join(m for m in ('asyncio', 'google.protobuf', 'argparse', 'json', 'subprocess', "
            "'hashlib', 'dataclasses', 'socket', 'logging', 'ctypes', 'typing', 're') if m in new))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout.strip()) == (0, "")


def test_newcomer_errors_say_what_to_do(tmp_path, monkeypatch):
    """Not root (the socket dir is root-only) and a socket path too long: one line each, with the fix."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    args = cli.parse_args(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "-bundle", str(bundle)])
    monkeypatch.setattr(sys, "stdin", open(os.devnull))

    def denied(*a, **kw):  # what a non-root user meets at /run/containerd/s
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli, "SOCKET_DIR", "/run/pyrunc-test-s")  # short: tmp_path is too long for a socket
    monkeypatch.setattr(os, "makedirs", denied)
    with pytest.raises(cli.ShimError, match="containerd and its shims run as root") as e:
        cli.start(args)
    assert "\n" not in str(e.value)
    monkeypatch.undo()

    monkeypatch.setattr(cli, "SOCKET_DIR", "/" + "x" * 120)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    with pytest.raises(cli.ShimError, match="use a shorter socket_dir"):
        cli.start(args)
