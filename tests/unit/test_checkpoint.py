"""Checkpoint and restore through the Task service and Container, end to end against a fake runc.

The fake runc records its argv and plays runc's part: ``create``/``restore``/``exec`` start a real process
(the "container's init" or the exec'd one, a shell that writes one line and sleeps) whose pid goes to the
pid file and which becomes our child when the fake exits (we are the subreaper); ``checkpoint`` writes
criu's dump.log into the work dir and, without --leave-running, kills the init as runc does after a
dump; ``kill`` signals the init; ``ps`` prints what it is told to; each verb can be told to fail with a
runc log error.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from shim import cgroups, options
from shim.api.containerd.events import task_pb2 as events
from shim.api.containerd.runc.v1 import options_pb2
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from shim.options import RuncOptions
from shim.process import Stdio
from shim.reaper import Reaper, set_child_subreaper
from shim.service import TaskService
from shim.stdio import ProcessIO
from shim.ttrpc import Code, TTRPCError

CRIU = "/opt/criu/sbin/criu"
NS = "ns1"
CID = "c1"

FAKE_RUNC = """#!{python} -I
import json, os, signal, subprocess, sys, time
here = {here!r}
args = sys.argv[1:]
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
values = {{"--root", "--log", "--log-format", "--criu"}}
i = 0
while args[i].startswith("--"):
    i += 2 if args[i] in values else 1
verb, rest = args[i], args[i + 1:]
def opt(name):
    return rest[rest.index(name) + 1] if name in rest else None
with open(os.path.join(here, "behaviour.json")) as f:
    b = json.load(f).get(verb, {{}})
init_file = os.path.join(here, "init.pid")
if verb == "checkpoint" and not b.get("no_dump_log"):
    work = opt("--work-path")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "dump.log"), "w") as f:
        f.write(b.get("dump_log", "criu dumped\\n"))
if b.get("error"):
    with open(opt_log := args[args.index("--log") + 1], "a") as f:
        f.write(json.dumps({{"level": "error", "msg": b["error"]}}) + "\\n")
    sys.exit(1)
if verb in ("create", "restore", "exec"):
    p = subprocess.Popen(["sh", "-c", "echo " + verb + "d; exec sleep 1000"], start_new_session=True)
    with open(os.path.join(here, "spawned"), "a") as f:
        f.write(str(p.pid) + " ")
    time.sleep(b.get("delay", 0))  # a runc still at work when its caller goes away
    for path in (opt("--pid-file"), *([init_file] if verb != "exec" else [])):
        if path != init_file and b.get("no_pid"):
            continue
        with open(path, "w") as f:
            f.write("not-a-pid" if b.get("bad_pid") and path != init_file else str(p.pid))
elif verb == "ps":
    print(b.get("stdout", "[]"))
elif verb == "start":
    time.sleep(b.get("delay", 0))
elif verb == "checkpoint":
    os.makedirs(opt("--image-path"), exist_ok=True)
    if "--leave-running" not in rest:
        with open(init_file) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        time.sleep(0.3)  # the init's exit is reaped while the checkpoint is still in flight
elif verb == "kill":
    with open(init_file) as f:
        os.kill(int(f.read()), int(rest[-1]))
elif verb == "delete" and "--force" in rest and os.path.exists(init_file):
    with open(init_file) as f:
        try:
            os.kill(int(f.read()), signal.SIGKILL)
        except ProcessLookupError:
            pass
"""


class Fake:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "fake"
        self.dir.mkdir()
        self.binary = self.dir / "runc"
        self.binary.write_text(FAKE_RUNC.format(python=sys.executable, here=str(self.dir)))
        self.binary.chmod(0o755)
        self.behave()

    def behave(self, **verbs: dict[str, Any]) -> None:
        (self.dir / "behaviour.json").write_text(json.dumps(verbs))

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        calls = [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
        return calls

    def verbs(self) -> list[str]:
        return [argv[GLOBAL_FLAGS] for argv in self.calls()]

    def init_pid(self) -> int:
        return int((self.dir / "init.pid").read_text())

    def spawned(self) -> list[int]:
        path = self.dir / "spawned"
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []


class Stack:
    """A TaskService over the fake runc, with a bundle and the events it published."""

    def __init__(self, tmp_path: Path, reaper: Reaper, fake: Fake, **options: Any) -> None:
        self.tmp = tmp_path
        self.fake = fake
        self.bundle = tmp_path / "bundle"
        self.bundle.mkdir(exist_ok=True)
        # a pid namespace of its own: no "runc kill --all" after the init's exit
        (self.bundle / "config.json").write_text(json.dumps({"linux": {"namespaces": [{"type": "pid"}]}}))
        self.events: list[Any] = []
        opts = RuncOptions(binary_name=str(fake.binary), root=str(tmp_path / "root"), criu_path=CRIU, **options)
        self.service = TaskService(NS, reaper, self.events.append, opts, lambda: None)

        # runc's global flags: the runtime's root for the namespace, the bundle's log, the criu path
        self.runc = ["--root", str(tmp_path / "root" / NS), "--log", str(self.bundle / "log.json"),
                     "--log-format", "json", "--criu", CRIU]

    async def acall(self, method: str, request: Any) -> Any:
        return await getattr(self.service, method)(None, request)

    def topics(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


GLOBAL_FLAGS = 8  # --root R --log L --log-format json --criu C


@pytest.fixture(scope="module", autouse=True)
def subreaper():
    set_child_subreaper()
    yield
    set_child_subreaper(False)  # orphans of later tests must not become our zombies


@pytest.fixture(autouse=True)
def no_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake's processes sit in the test's own cgroup: no stats or OOM watch on that.
    def find(pid: int) -> cgroups.Cgroup:
        raise cgroups.CgroupError(f"no cgroup for {pid} in unit tests")

    monkeypatch.setattr(cgroups, "find", find)


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def run(tmp_path: Path, fake: Fake, test: Callable[[Stack], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        try:
            await asyncio.wait_for(test(Stack(tmp_path, reaper, fake, **options)), 30)
        finally:
            reaper.close()
        for pid in fake.spawned():  # every init was reaped by the shim's reaper, none left running
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    asyncio.run(main())


def pack(msg: Any) -> any_pb2.Any:
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


async def code_of(aw: Awaitable[Any]) -> tuple[int, str]:
    try:
        await aw
    except TTRPCError as e:
        return e.code, e.message
    return Code.OK, ""


async def created_and_started(s: Stack) -> int:
    await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
    started = await s.acall("Start", api.StartRequest(id=CID))
    assert s.fake.verbs() == ["create", "start"]
    return started.pid


async def kill_and_delete(s: Stack, expect_status: int = 128 + signal.SIGKILL) -> None:
    if not s.service.container(CID).init.exited:
        await s.acall("Kill", api.KillRequest(id=CID, signal=signal.SIGKILL))
    waited = await s.acall("Wait", api.WaitRequest(id=CID))
    assert waited.exit_status == expect_status
    await s.acall("Delete", api.DeleteRequest(id=CID))
    s.fake.calls()


# -- checkpoint --------------------------------------------------------------------------------------

def test_checkpoint_leaves_running_by_default_in_a_work_dir_it_removes(tmp_path: Path, fake: Fake) -> None:
    image = str(tmp_path / "image")

    async def test(s: Stack) -> None:
        pid = await created_and_started(s)
        await s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID, path=image))
        assert s.fake.calls() == [[*s.runc, "checkpoint", "--image-path", image, "--work-path",
                                   str(s.bundle / "criu-work"), "--leave-running", CID]]
        assert not (s.bundle / "criu-work").exists(), "a default work dir is removed afterwards"
        assert s.events[-1] == events.TaskCheckpointed(container_id=CID, checkpoint=image)
        state = await s.acall("State", api.StateRequest(id=CID))
        assert (state.status, state.pid) == (types.RUNNING, pid)
        # a paused container can be checkpointed too (containerd pauses it around the call)
        await s.acall("Pause", api.PauseRequest(id=CID))
        await s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID, path=image))
        assert s.fake.verbs() == ["pause", "checkpoint"]
        assert (await s.acall("State", api.StateRequest(id=CID))).status == types.PAUSED
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_checkpoint_options_exit_stops_the_container_after_the_event(tmp_path: Path, fake: Fake) -> None:
    work = tmp_path / "my-work"
    options = options_pb2.CheckpointOptions(
        exit=True, open_tcp=True, external_unix_sockets=True, terminal=True, file_locks=True,
        empty_namespaces=["network", "ipc"], cgroups_mode="soft", image_path="/not/this/one", work_path=str(work))

    async def test(s: Stack) -> None:
        pid = await created_and_started(s)
        image = str(tmp_path / "image")
        await s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID, path=image, options=pack(options)))
        assert s.fake.calls() == [[*s.runc, "checkpoint", "--image-path", image, "--work-path", str(work),
                                   "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
                                   "--manage-cgroups-mode", "soft", "--empty-ns", "network", "--empty-ns", "ipc",
                                   CID]]
        assert (work / "dump.log").exists(), "a work dir that was asked for is kept"
        waited = await s.acall("Wait", api.WaitRequest(id=CID))
        assert waited.exit_status == 128 + signal.SIGKILL
        # the init died during the dump, yet its exit is published after the checkpoint
        assert s.topics() == ["TaskCreate", "TaskStart", "TaskCheckpointed", "TaskExit"]
        assert s.events[-1].pid == pid
        # runc removed the container after the dump: runc delete's "does not exist" is not an error
        s.fake.behave(delete={"error": f"container {CID} does not exist"})
        deleted = await s.acall("Delete", api.DeleteRequest(id=CID))
        assert (deleted.pid, deleted.exit_status) == (pid, 128 + signal.SIGKILL)
        assert s.fake.verbs() == ["delete"]
        assert s.topics()[-1] == "TaskDelete"

    run(tmp_path, fake, test)


def test_checkpoint_image_path_from_the_options_when_the_request_has_none(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await created_and_started(s)
        opts = pack(options_pb2.CheckpointOptions(image_path="/from/options"))
        await s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID, options=opts))
        assert s.fake.calls()[0][GLOBAL_FLAGS:GLOBAL_FLAGS + 3] == ["checkpoint", "--image-path", "/from/options"]
        assert s.events[-1].checkpoint == "/from/options"
        assert await code_of(s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID))) == (
            Code.INVALID_ARGUMENT, "checkpoint needs an image path (request path or options)")
        assert s.fake.calls() == []
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_checkpoint_failure_keeps_criu_dump_log_in_the_bundle(tmp_path: Path, fake: Fake) -> None:
    image = str(tmp_path / "image")

    async def test(s: Stack) -> None:
        await created_and_started(s)
        work = s.bundle / "criu-work"
        fake.behave(checkpoint={"error": f"criu failed: type DUMP errno 0\nlog file: {work}/dump.log",
                                "dump_log": "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n"})
        code, message = await code_of(s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID, path=image)))
        assert (code, message) == (Code.UNKNOWN, "OCI runtime checkpoint failed: criu failed: type DUMP errno 0"
                                                 f" path= {s.bundle}/criu-dump.log")
        assert (s.bundle / "criu-dump.log").read_text() == \
            "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n"
        assert not work.exists()
        assert s.topics() == ["TaskCreate", "TaskStart"]  # no checkpoint event
        assert (await s.acall("State", api.StateRequest(id=CID))).status == types.RUNNING
        # the exit is not held back by the failed checkpoint
        await kill_and_delete(s)
        assert s.topics() == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]

    run(tmp_path, fake, test)


def test_checkpoint_failure_without_dump_log_names_none(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await created_and_started(s)
        # runc failed before criu wrote anything: no criu-dump.log to point at
        fake.behave(checkpoint={"error": "container is not running", "no_dump_log": True})
        code, message = await code_of(s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID, path="/img")))
        assert (code, message) == (Code.UNKNOWN, "OCI runtime checkpoint failed: container is not running")
        assert not (s.bundle / "criu-dump.log").exists()
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_checkpoint_refusals(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        req = api.CheckpointTaskRequest
        assert (await code_of(s.acall("Checkpoint", req(id="nope", path="/img"))))[0] == Code.NOT_FOUND
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
        assert await code_of(s.acall("Checkpoint", req(id=CID, path="/img"))) == (
            Code.FAILED_PRECONDITION, "cannot checkpoint a created container")
        await s.acall("Start", api.StartRequest(id=CID))
        wrong = pack(options_pb2.Options(binary_name="runc"))
        assert await code_of(s.acall("Checkpoint", req(id=CID, path="/img", options=wrong))) == (
            Code.INVALID_ARGUMENT,
            "checkpoint options must be containerd.runc.v1.CheckpointOptions, not 'containerd.runc.v1.Options'")
        garbage = any_pb2.Any(type_url="containerd.runc.v1.CheckpointOptions", value=b"\xff\xff")
        code, message = await code_of(s.acall("Checkpoint", req(id=CID, path="/img", options=garbage)))
        assert code == Code.INVALID_ARGUMENT and message.startswith("invalid containerd.runc.v1.CheckpointOptions")
        assert s.fake.verbs() == ["create", "start"]  # nothing reached runc
        await s.acall("Kill", api.KillRequest(id=CID, signal=signal.SIGKILL))
        await s.acall("Wait", api.WaitRequest(id=CID))
        assert await code_of(s.acall("Checkpoint", req(id=CID, path="/img"))) == (
            Code.FAILED_PRECONDITION, "cannot checkpoint a stopped container")
        await kill_and_delete(s)

    run(tmp_path, fake, test)


def test_checkpoint_without_criu_path_passes_no_criu_flag(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        opts = pack(options_pb2.Options(binary_name=str(fake.binary), root=str(tmp_path / "root")))
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), options=opts))
        await s.acall("Start", api.StartRequest(id=CID))
        fake.calls()
        await s.acall("Checkpoint", api.CheckpointTaskRequest(id=CID, path="/img"))
        (argv,) = fake.calls()
        assert "--criu" not in argv and argv[argv.index("checkpoint") - 1] == "json"
        await kill_and_delete(s)

    run(tmp_path, fake, test)


# -- restore -----------------------------------------------------------------------------------------

def test_create_from_checkpoint_restores_at_start(tmp_path: Path, fake: Fake) -> None:
    out = tmp_path / "out.log"
    image, parent = str(tmp_path / "image"), str(tmp_path / "parent")

    async def test(s: Stack) -> None:
        created = await s.acall("Create", api.CreateTaskRequest(
            id=CID, bundle=str(s.bundle), checkpoint=image, parent_checkpoint=parent, stdout=f"file://{out}"))
        assert created.pid == 0  # as Go: no process before Start
        assert fake.calls() == [], "nothing runs at Create: runc restore happens at Start"
        assert s.events == [events.TaskCreate(container_id=CID, bundle=str(s.bundle), checkpoint=image, pid=0,
                                              io=events.TaskIO(stdout=f"file://{out}"))]
        state = await s.acall("State", api.StateRequest(id=CID))
        assert (state.status, state.pid) == (types.CREATED, 0)
        assert await code_of(s.acall("Exec", api.ExecProcessRequest(
            id=CID, exec_id="e1", spec=any_pb2.Any(value=b"{}")))) == (
            Code.FAILED_PRECONDITION, "cannot exec in a container not yet restored")

        started = await s.acall("Start", api.StartRequest(id=CID))
        assert fake.calls() == [[*s.runc, "restore", "--image-path", image, "--work-path", "/criu/work",
                                 "--parent-path", parent, "--detach", "--pid-file", str(s.bundle / "init.pid"),
                                 "--no-subreaper", "--bundle", str(s.bundle), CID]]
        assert started.pid == fake.init_pid() > 0
        assert s.events[-1] == events.TaskStart(container_id=CID, pid=started.pid)
        state = await s.acall("State", api.StateRequest(id=CID))
        assert (state.status, state.pid) == (types.RUNNING, started.pid)
        for _ in range(100):  # the restored process writes to the stdio the shim prepared at Create
            if out.exists() and out.read_text():
                break
            await asyncio.sleep(0.02)
        assert out.read_text() == "restored\n"
        connect = await s.acall("Connect", api.ConnectRequest(id=CID))
        assert connect.task_pid == started.pid
        await kill_and_delete(s)  # its exit is reaped and published like any init's
        assert s.topics() == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]
        assert s.events[2].pid == started.pid

    run(tmp_path, fake, test, criu_work_path="/criu/work")


def test_restore_without_criu_work_path_and_with_no_pivot(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), checkpoint="/img"))
        await s.acall("Start", api.StartRequest(id=CID))
        assert fake.calls() == [[*s.runc, "restore", "--image-path", "/img", "--detach", "--pid-file",
                                 str(s.bundle / "init.pid"), "--no-pivot", "--no-subreaper", "--bundle",
                                 str(s.bundle), CID]]
        await kill_and_delete(s)

    run(tmp_path, fake, test, no_pivot_root=True)


def test_delete_of_a_never_restored_container(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), checkpoint="/img"))
        fake.behave(delete={"error": f"container {CID} does not exist"})
        deleted = await s.acall("Delete", api.DeleteRequest(id=CID))
        assert deleted.pid == 0
        assert fake.verbs() == ["delete"]  # runc knows nothing of it: its "does not exist" is fine
        assert s.topics() == ["TaskCreate", "TaskDelete"]
        assert (await code_of(s.acall("State", api.StateRequest(id=CID))))[0] == Code.NOT_FOUND

    run(tmp_path, fake, test)


def test_failed_restore_leaves_it_created(tmp_path: Path, fake: Fake) -> None:
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), checkpoint="/img"))
        fake.behave(restore={"error": "criu failed: type RESTORE errno 0"})
        assert await code_of(s.acall("Start", api.StartRequest(id=CID))) == (
            Code.UNKNOWN, "OCI runtime restore failed: criu failed: type RESTORE errno 0")
        state = await s.acall("State", api.StateRequest(id=CID))
        assert (state.status, state.pid) == (types.CREATED, 0)
        assert s.topics() == ["TaskCreate"]
        fake.behave(delete={"error": f"container {CID} does not exist"})
        await s.acall("Delete", api.DeleteRequest(id=CID))
        assert fake.verbs() == ["restore", "delete"]

    run(tmp_path, fake, test)


# -- io_uid / io_gid ---------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="fchown to another owner needs root")


@needs_root
def test_process_io_chowns_the_pipes_it_makes(tmp_path: Path) -> None:
    stdin, stdout, stderr = (str(tmp_path / n) for n in ("stdin", "stdout", "stderr"))
    for path in (stdin, stdout, stderr):
        os.mkfifo(path)
    keep = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in (stdout, stderr)]  # containerd reading

    async def main() -> None:
        for owner, want in (((1234, 5678), (1234, 5678)), ((0, 0), (0, 0)), ((0, 42), (0, 42))):
            pio = await ProcessIO.open(Stdio(stdin, stdout, stderr), reaper=None, namespace="ns",  # type: ignore[arg-type]
                                       process_id="p", io_uid=owner[0], io_gid=owner[1])
            try:
                in_r, out_w, err_w = (os.fstat(fd) for fd in pio.child_fds)
                assert (in_r.st_uid, in_r.st_gid) == want, "the stdin pipe's read end"
                assert (err_w.st_uid, err_w.st_gid) == want, "the stderr pipe's write end"
                # stdout is the client's FIFO itself: its file is not ours to chown
                assert (out_w.st_uid, out_w.st_gid) == (os.stat(stdout).st_uid, os.stat(stdout).st_gid) == (0, 0)
            finally:
                pio.close()

    try:
        asyncio.run(main())
    finally:
        for fd in keep:
            os.close(fd)


@needs_root
def test_container_gives_io_uid_and_gid_to_its_processes_pipes(tmp_path: Path, fake: Fake) -> None:
    stdin = tmp_path / "stdin"
    os.mkfifo(stdin)

    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), stdin=str(stdin)))
        st = os.stat(f"/proc/{fake.init_pid()}/fd/0")  # what the container's init reads
        assert (st.st_uid, st.st_gid) == (1000, 1001)
        await s.acall("Start", api.StartRequest(id=CID))
        await kill_and_delete(s)

    run(tmp_path, fake, test, io_uid=1000, io_gid=1001)


def test_runtime_options_reach_runcs_command_line(tmp_path: Path, fake: Fake) -> None:
    """systemd_cgroup, no_pivot_root and no_new_keyring, from the runtime options to runc's argv."""
    async def test(s: Stack) -> None:
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle)))
        (create,) = s.fake.calls()
        assert "--systemd-cgroup" in create[:create.index("create")]
        assert {"--no-pivot", "--no-new-keyring"} <= set(create[create.index("create"):])
        await s.acall("Kill", api.KillRequest(id=CID, signal=signal.SIGKILL))
        await s.acall("Wait", api.WaitRequest(id=CID))
        await s.acall("Delete", api.DeleteRequest(id=CID))
        s.fake.calls()

    run(tmp_path, fake, test, systemd_cgroup=True, no_pivot_root=True, no_new_keyring=True)


def test_a_create_that_fails_after_runc_created_removes_the_runc_container(tmp_path: Path, fake: Fake) -> None:
    """runc made the container, then the shim could not finish (here: an unreadable pid file): nobody
    would ever own it, so it is deleted with --force (and its init killed), not left behind."""
    async def test(s: Stack) -> None:
        fake.behave(create={"bad_pid": True})
        code, message = await code_of(s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle))))
        assert code == Code.UNKNOWN and "bad pid file" in message
        for _ in range(100):
            verbs = [argv[GLOBAL_FLAGS:] for argv in fake.calls()]
            if verbs[-1:] == [["delete", "--force", CID]] or ["delete", "--force", CID] in verbs:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("no runc delete --force after the failed create")
        assert CID not in s.service.containers
        for _ in range(100):  # the reaper collects the killed init
            if all(p_gone(pid) for pid in fake.spawned()):
                break
            await asyncio.sleep(0.02)

    run(tmp_path, fake, test)


def p_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_runtime_config_file_is_read_off_the_event_loop(tmp_path: Path, fake: Fake,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """runtimeoptions name a TOML file (config_path): read with blocking I/O, so not on the loop."""
    config = tmp_path / "pyrunc.toml"
    config.write_text(f'binary_name = "{fake.binary}"\nroot = "{tmp_path / "root"}"\nno_new_keyring = true\n')
    readers: list[threading.Thread] = []
    read = options.from_config_file

    def recording(path: str) -> RuncOptions:
        readers.append(threading.current_thread())
        return read(path)

    monkeypatch.setattr(options, "from_config_file", recording)

    async def test(s: Stack) -> None:
        opts = pack(runtimeoptions_pb2.Options(config_path=str(config)))
        await s.acall("Create", api.CreateTaskRequest(id=CID, bundle=str(s.bundle), options=opts))
        (create,) = s.fake.calls()
        assert "--no-new-keyring" in create, "the file's options were used"
        assert readers and threading.main_thread() not in readers
        await s.acall("Kill", api.KillRequest(id=CID, signal=signal.SIGKILL))
        await s.acall("Wait", api.WaitRequest(id=CID))
        await s.acall("Delete", api.DeleteRequest(id=CID))
        s.fake.calls()

    run(tmp_path, fake, test)
