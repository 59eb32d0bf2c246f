"""The runc client against a fake runc that records its argv, and one check against the real runc."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shim.reaper import Reaper, set_child_subreaper
from shim.runc import CriuOptions, Runc, RuncError

FAKE_RUNC = """#!{python} -I
import json, os, subprocess, sys
here = {here!r}
args = sys.argv[1:]
with open(os.path.join(here, "behaviour.json")) as f:
    b = json.load(f)
record = {{"argv": args, "stdin": sys.stdin.read(), "notify": os.environ.get("NOTIFY_SOCKET")}}
if "--process" in args:
    with open(args[args.index("--process") + 1]) as f:
        record["process"] = f.read()
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\\n")
if "--log" in args:
    with open(args[args.index("--log") + 1], "a") as f:
        for line in b.get("log", []):
            f.write(line + "\\n")
if b.get("linger"):
    # A child that keeps our stdout open, as a container's init keeps runc's.
    p = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)
    with open(os.path.join(here, "linger.pid"), "w") as f:
        f.write(str(p.pid))
sys.stdout.write(b.get("stdout", ""))
sys.stdout.flush()
sys.stderr.write(b.get("stderr", ""))
sys.exit(b.get("status", 0))
"""


class Fake:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "fake"
        self.dir.mkdir()
        self.binary = self.dir / "runc"
        self.binary.write_text(FAKE_RUNC.format(python=sys.executable, here=str(self.dir)))
        self.binary.chmod(0o755)
        self.behave()

    def behave(self, **behaviour: Any) -> None:
        (self.dir / "behaviour.json").write_text(json.dumps(behaviour))

    def calls(self) -> list[dict[str, Any]]:
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        calls = [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
        return calls

    def argv(self) -> list[str]:
        (call,) = self.calls()
        return call["argv"]


@pytest.fixture(scope="module", autouse=True)
def subreaper():
    set_child_subreaper()
    yield
    set_child_subreaper(False)  # orphans of later tests must not become our zombies


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def run(test: Callable[[Reaper], Awaitable[None]]) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        try:
            await asyncio.wait_for(test(reaper), 30)
        finally:
            reaper.close()
        with pytest.raises(ChildProcessError):  # every runc, and what it left behind, was reaped
            os.waitpid(-1, os.WNOHANG)

    asyncio.run(main())


def error_line(msg: str) -> str:
    return json.dumps({"level": "error", "msg": msg, "time": "2024-01-01T00:00:00Z"})


GLOBAL = ["--root", "/run/R", "--log", "/dev/null", "--log-format", "json", "--systemd-cgroup"]


def test_argv_of_each_verb(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    async def test(reaper: Reaper) -> None:
        runc = Runc(reaper, str(fake.binary), root="/run/R", log="/dev/null", systemd_cgroup=True)
        await runc.create("c1", "/b", pid_file="init.pid", console_socket="/s.sock", no_pivot=True,
                          no_new_keyring=True)
        assert fake.argv() == [*GLOBAL, "create", "--bundle", "/b", "--pid-file",
                               str(tmp_path / "init.pid"), "--console-socket", "/s.sock", "--no-pivot",
                               "--no-new-keyring", "c1"]
        await runc.create("c1", "/b", pid_file="/b/init.pid")
        assert fake.argv() == [*GLOBAL, "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "c1"]
        await runc.start("c1")
        assert fake.argv() == [*GLOBAL, "start", "c1"]

        spec = b'{"args": ["sh"], "cwd": "/"}'
        await runc.exec("c1", spec, pid_file="/b/e1.pid", console_socket="/s.sock")
        (call,) = fake.calls()
        process_file = call["argv"][len(GLOBAL) + 2]
        assert call["argv"] == [*GLOBAL, "exec", "--process", process_file, "--console-socket", "/s.sock",
                                "--detach", "--pid-file", "/b/e1.pid", "c1"]
        assert call["process"] == spec.decode()
        assert not os.path.exists(process_file)
        await runc.exec("c1", spec, pid_file="/b/e1.pid", detach=False)
        assert fake.argv()[len(GLOBAL) + 3:] == ["--pid-file", "/b/e1.pid", "c1"]

        await runc.kill("c1", signal.SIGKILL, all=True)
        assert fake.argv() == [*GLOBAL, "kill", "--all", "c1", "9"]
        await runc.kill("c1", 15)
        assert fake.argv() == [*GLOBAL, "kill", "c1", "15"]
        await runc.delete("c1", force=True)
        assert fake.argv() == [*GLOBAL, "delete", "--force", "c1"]
        await runc.delete("c1")
        assert fake.argv() == [*GLOBAL, "delete", "c1"]
        await runc.pause("c1")
        assert fake.argv() == [*GLOBAL, "pause", "c1"]
        await runc.resume("c1")
        assert fake.argv() == [*GLOBAL, "resume", "c1"]

        fake.behave(stdout="[1, 22, 333]\n")
        assert await runc.ps("c1") == [1, 22, 333]
        assert fake.argv() == [*GLOBAL, "ps", "--format", "json", "c1"]
        fake.behave(stdout="null\n")
        assert await runc.ps("c1") == []
        fake.calls()

        fake.behave(stdout='{"id": "c1", "pid": 42, "status": "running"}')
        assert await runc.state("c1") == {"id": "c1", "pid": 42, "status": "running"}
        assert fake.argv() == [*GLOBAL, "state", "c1"]

        fake.behave()
        await runc.update("c1", b'{"memory": {"limit": 1048576}}')
        (call,) = fake.calls()
        assert call["argv"] == [*GLOBAL, "update", "--resources", "-", "c1"]
        assert call["stdin"] == '{"memory": {"limit": 1048576}}'

    run(test)


def test_checkpoint_and_restore_argv(fake: Fake) -> None:
    async def test(reaper: Reaper) -> None:
        runc = Runc(reaper, str(fake.binary), root="/run/R", criu="/usr/sbin/criu")
        full = CriuOptions("/img", work_path="/work", parent_path="/parent", tcp_established=True, ext_unix_sk=True,
                           shell_job=True, file_locks=True, cgroups_mode="soft", empty_namespaces=("network", "ipc"))
        await runc.checkpoint("c1", full)
        assert fake.argv() == ["--root", "/run/R", "--criu", "/usr/sbin/criu", "checkpoint", "--image-path", "/img",
                               "--work-path", "/work", "--parent-path", "/parent", "--tcp-established",
                               "--ext-unix-sk", "--shell-job", "--file-locks", "--manage-cgroups-mode", "soft",
                               "--empty-ns", "network", "--empty-ns", "ipc", "--leave-running", "c1"]
        await runc.checkpoint("c1", CriuOptions("/img"), leave_running=False)
        assert fake.argv() == ["--root", "/run/R", "--criu", "/usr/sbin/criu", "checkpoint", "--image-path", "/img",
                               "c1"]
        await runc.restore("c1", "/b", CriuOptions("/img", work_path="/w"), pid_file="/b/init.pid",
                           console_socket="/s.sock", no_pivot=True)
        assert fake.argv() == ["--root", "/run/R", "--criu", "/usr/sbin/criu", "restore", "--image-path", "/img",
                               "--work-path", "/w", "--detach", "--pid-file", "/b/init.pid", "--console-socket",
                               "/s.sock", "--no-pivot", "--no-subreaper", "--bundle", "/b", "c1"]

    run(test)


def test_no_global_flags_binary_on_path_and_notify_socket(fake: Fake,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake.dir}:{os.environ['PATH']}")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")

    async def test(reaper: Reaper) -> None:
        runc = Runc(reaper)
        await runc.start("c1")
        (call,) = fake.calls()
        assert call["argv"] == ["start", "c1"]
        assert call["notify"] is None  # only meant for processes systemd starts
        assert call["stdin"] == ""

    run(test)


def test_error_message_from_what_this_call_appended_to_the_log(fake: Fake, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text(error_line("an older failure") + "\n")

    async def test(reaper: Reaper) -> None:
        runc = Runc(reaper, str(fake.binary), log=str(log))
        fake.behave(status=1, stderr="noise on stderr", log=[
            json.dumps({"level": "info", "msg": "starting"}),
            error_line("first error"),
            "not json at all",
            error_line("  container does not exist\n"),
            json.dumps({"level": "warning", "msg": "after"}),
        ])
        with pytest.raises(RuncError) as caught:
            await runc.delete("c1")
        err = caught.value
        assert str(err) == "runc delete failed: container does not exist"
        assert err.status == 1
        assert err.command == "delete"
        assert err.argv == [str(fake.binary), "--log", str(log), "--log-format", "json", "delete", "c1"]
        assert err.not_found and not err.not_running

        # Nothing logged this time: the older errors in the file are not this call's.
        fake.behave(status=1, stderr="container not running\n")
        with pytest.raises(RuncError) as caught:
            await runc.kill("c1", 9)
        assert str(caught.value) == "runc kill failed: container not running"
        assert caught.value.not_running and not caught.value.not_found

    run(test)


def test_error_without_log(fake: Fake) -> None:
    async def test(reaper: Reaper) -> None:
        runc = Runc(reaper, str(fake.binary))
        fake.behave(status=1, stderr='time="x" level=error msg="container does not exist"\n')
        with pytest.raises(RuncError) as caught:
            await runc.state("c1")
        assert caught.value.not_found
        assert str(caught.value).startswith("runc state failed: time=")

        fake.behave(status=3)
        with pytest.raises(RuncError) as caught:
            await runc.pause("c1")
        assert str(caught.value) == "runc pause failed: exit status 3"
        assert caught.value.status == 3

    run(test)


def test_create_gives_its_stdio_to_the_container(fake: Fake) -> None:
    async def test(reaper: Reaper) -> None:
        runc = Runc(reaper, str(fake.binary))
        r, w = os.pipe()
        fake.behave(stdout="container output\n")
        await runc.create("c1", "/b", pid_file="/b/init.pid", stdout=w, stderr=w)
        os.close(w)
        assert os.read(r, 100) == b"container output\n"
        os.close(r)

    run(test)


def test_large_output_does_not_block(fake: Fake) -> None:
    pids = list(range(1, 40000))

    async def test(reaper: Reaper) -> None:
        fake.behave(stdout=json.dumps(pids))  # well beyond a pipe's 64 KiB
        assert await Runc(reaper, str(fake.binary)).ps("c1") == pids

    run(test)


def test_output_held_open_by_a_grandchild_does_not_hang(fake: Fake) -> None:
    async def test(reaper: Reaper) -> None:
        fake.behave(linger=True, stdout='{"id": "c1"}')
        started = time.monotonic()
        assert await Runc(reaper, str(fake.binary)).state("c1") == {"id": "c1"}
        assert time.monotonic() - started < 10
        lingering = int((fake.dir / "linger.pid").read_text())
        os.kill(lingering, signal.SIGKILL)
        assert await reaper.wait_for(lingering) == 128 + signal.SIGKILL

    run(test)


def test_real_runc_state_of_missing_container(tmp_path: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not on PATH")
    if os.geteuid() != 0:
        pytest.skip("runc needs root")

    async def test(reaper: Reaper) -> None:
        root = tmp_path / "root"
        root.mkdir()
        for log in (str(tmp_path / "log.json"), None):
            runc = Runc(reaper, root=str(root), log=log)
            with pytest.raises(RuncError) as caught:
                await runc.state("does-not-exist")
            assert caught.value.not_found, str(caught.value)
            assert str(caught.value).startswith("runc state failed: ")

    run(test)


def test_missing_runc_is_a_clear_error() -> None:
    async def test(reaper: Reaper) -> None:
        runc = Runc(reaper, "/nonexistent/runc")
        with pytest.raises(RuncError) as caught:
            await runc.start("c1")
        assert "install runc (apt-get install runc) or set binary_name" in str(caught.value)
        runc = Runc(reaper, "no-such-runc-on-path")
        with pytest.raises(RuncError) as caught:
            await runc.state("c1")
        assert "no-such-runc-on-path: executable file not found" in str(caught.value)

    run(test)


def test_process_spec_file_is_private_and_where_go_runc_puts_it(tmp_path, monkeypatch):
    from shim.runc.client import _write_spec

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    paths = [_write_spec(b'{"args": ["true"]}') for _ in range(3)]
    assert len(set(paths)) == 3
    for path in paths:
        assert os.path.dirname(path) == str(tmp_path)
        assert os.path.basename(path).startswith("runc-process") and path.endswith(".json")
        assert os.stat(path).st_mode & 0o777 == 0o600
        with open(path, "rb") as f:
            assert f.read() == b'{"args": ["true"]}'
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    assert os.path.dirname(_write_spec(b"{}")) == str(tmp_path / "t")
