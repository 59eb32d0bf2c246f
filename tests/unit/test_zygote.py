"""The zygote: request framing, and a real zygote process forking a server for a request."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shim import zygote
from shim.testing.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_tmp():
    """pytest's tmp_path is too long for unix socket paths (107 bytes)."""
    d = tempfile.mkdtemp(prefix="zy-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_pack_round_trip_and_truncation():
    items = [b"", b"a", b"\x00" * 300, "é".encode()]
    assert zygote._unpack(zygote._pack(items)) == items
    try:
        zygote._unpack(zygote._pack(items)[:-1])
        raise AssertionError("truncated request accepted")
    except ValueError:
        pass


def test_socket_path_depends_on_address_and_code(short_tmp):
    a = zygote.socket_path("/run/a.sock", str(short_tmp))
    assert a == zygote.socket_path("/run/a.sock", str(short_tmp))
    assert a != zygote.socket_path("/run/b.sock", str(short_tmp))
    assert a.startswith(str(short_tmp) + "/pyrunc-zygote-") and len(a) < 108


def test_socket_path_changes_with_any_source_file(short_tmp, tmp_path, monkeypatch):
    package = tmp_path / "shim"
    (package / "sub" / "__pycache__").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 1\n")
    monkeypatch.setattr(zygote, "_SHIM_DIR", str(package))
    first = zygote.socket_path("/run/a.sock", str(short_tmp))
    (package / "sub" / "__pycache__" / "b.cpython-312.pyc").write_bytes(b"compiled")
    (package / "notes.txt").write_text("not code")
    assert zygote.socket_path("/run/a.sock", str(short_tmp)) == first, "only .py files count"
    (package / "sub" / "b.py").write_text("y = 22\n")
    second = zygote.socket_path("/run/a.sock", str(short_tmp))
    assert second != first, "an edited module in a subpackage"
    (package / "sub" / "c.py").write_text("")
    assert zygote.socket_path("/run/a.sock", str(short_tmp)) not in (first, second), "a new module"


def test_opt_out(monkeypatch):
    monkeypatch.setenv("PYRUNC_ZYGOTE", "0")
    assert not zygote.enabled()
    monkeypatch.delenv("PYRUNC_ZYGOTE")
    assert zygote.enabled()


def test_no_zygote_means_none(tmp_path):
    with socket.socket(socket.AF_UNIX) as listener:
        assert zygote.request_server(str(tmp_path / "absent"), [], str(tmp_path), listener.fileno(), b"") is None


def test_zygote_forks_a_detached_server_and_leaves_when_containerd_is_gone(short_tmp):
    tmp_path = short_tmp
    address = tmp_path / "containerd.sock"
    address.write_text("")
    path = zygote.socket_path(str(address), str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "shim.zygote", str(address), path],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    server_pid = None
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(tmp_path / "task.sock"))
            listener.listen()
            server_pid = zygote.request_server(
                path, ["-namespace", "ns", "-address", str(address), "-id", "c1", "-bundle", str(bundle)],
                str(bundle), listener.fileno(), b"", {"TTRPC_ADDRESS": str(tmp_path / "ttrpc.sock")})
        assert server_pid is not None
        deadline = time.monotonic() + 10  # the server sets itself up after the zygote answered
        while time.monotonic() < deadline:
            stat = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
            if Path(f"/proc/{server_pid}/cwd").resolve() == bundle:
                break
            time.sleep(0.02)
        assert int(stat[1]) != proc.pid, "the server is not the zygote's child (double fork)"
        assert int(stat[3]) == server_pid, "the server leads its own session"
        assert Path(f"/proc/{server_pid}/cwd").resolve() == bundle
        # (its environment is set with putenv, which /proc/<pid>/environ does not show; the
        # integration tests see events reach containerd through servers the zygote forked)
        address.unlink()  # containerd is gone: the zygote leaves by itself
        proc.wait(15)
        assert not os.path.exists(path)
    finally:
        if server_pid:
            os.kill(server_pid, 9)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_set_cmdline_rewrites_what_ps_shows(short_tmp):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from shim import zygote; "
            "zygote.set_cmdline(['containerd-shim-pyrunc-v2', '-id', 'abc']); "
            "print(open('/proc/self/cmdline', 'rb').read().rstrip(b'\\0').split(b'\\0'))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), " " * 200], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "[b'containerd-shim-pyrunc-v2', b'-id', b'abc']", out.stderr


def test_a_server_without_the_go_ahead_never_serves(short_tmp):
    """If start gives up after handing the socket over, it forks its own server; the zygote's must not
    also serve the same socket: it waits for a go-ahead that never comes, and leaves."""
    address = short_tmp / "containerd.sock"
    address.write_text("")
    path = zygote.socket_path(str(address), str(short_tmp))
    proc = subprocess.Popen([sys.executable, "-m", "shim.zygote", str(address), path],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        argv = [b"-namespace", b"ns", b"-address", str(address).encode(), b"-id", b"c1"]
        request = zygote._pack([zygote._pack([zygote._MAGIC, str(short_tmp).encode(), b"", b"%d" % len(argv),
                                              *argv])])
        with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as client:
            listener.bind(str(short_tmp / "task.sock"))
            listener.listen()
            client.connect(path)
            socket.send_fds(client, [request], [listener.fileno()])
            pid = int(client.recv(64))
        # no "G" was sent and the connection is closed: the forked server must leave without serving
        deadline = time.monotonic() + 10
        state = "?"
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            if state in ("Z", "gone"):
                break
            time.sleep(0.05)
        assert state in ("Z", "gone")
    finally:
        address.unlink(missing_ok=True)
        proc.kill()
        proc.wait()


def _spares(path: str, zygote_pid: int) -> list[int]:
    """Processes forked from the zygote that still carry its command line: its waiting spares."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != zygote_pid:
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if path.encode() in argv and state != "Z":
                found.append(int(entry))
    return found


def test_a_spare_waits_is_replaced_when_killed_and_leaves_with_the_zygote(short_tmp):
    address = short_tmp / "containerd.sock"
    address.write_text("")
    path = zygote.socket_path(str(address), str(short_tmp))
    proc = subprocess.Popen([sys.executable, "-m", "shim.zygote", str(address), path],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    servers = []
    try:
        assert wait_until(lambda: os.path.exists(path) and len(_spares(path, proc.pid)) == 1, 20)
        (spare,) = _spares(path, proc.pid)
        os.kill(spare, 9)  # a spare lost while waiting: the next request still gets a server
        assert wait_until(lambda: spare not in _spares(path, proc.pid))
        for n in range(2):
            bundle = short_tmp / f"bundle{n}"
            bundle.mkdir()
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(str(short_tmp / f"task{n}.sock"))
                listener.listen()
                pid = zygote.request_server(
                    path, ["-namespace", "ns", "-address", str(address), "-id", f"c{n}", "-bundle", str(bundle)],
                    str(bundle), listener.fileno(), b"", {"TTRPC_ADDRESS": str(short_tmp / "ttrpc.sock")})
            assert pid is not None and pid != spare
            servers.append(pid)
            assert wait_until(lambda b=bundle, p=pid: Path(f"/proc/{p}/cwd").resolve() == b)
            # spares warm up at the lowest CPU priority; a server never keeps it
            assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, proc.pid)
        assert len(set(servers)) == 2
        assert wait_until(lambda: len([p for p in _spares(path, proc.pid) if p not in servers]) == 1)
        address.unlink()  # the zygote leaves; its spare sees the channel close and leaves too
        proc.wait(15)
        assert wait_until(lambda: [p for p in _spares(path, proc.pid) if p not in servers] == [])
    finally:
        for pid in servers:
            os.kill(pid, 9)
        address.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_warm_up_sockets_of_dead_processes_are_found(short_tmp):
    path = str(short_tmp / "pyrunc-zygote-x")
    gone_pid = 2**22 + 7  # above pid_max's default: never a live process
    for pid in (os.getpid(), gone_pid):
        Path(f"{path}.warm-{pid}").write_text("")
    Path(f"{path}.lock").write_text("")
    assert zygote._warm_up_sockets(path) == [f"{path}.warm-{gone_pid}"]
