"""The Task service (containerd.task.v2.Task, served as v3 too): each handler looks up, delegates,
emits its event. Events are published with no ``await`` between the state change and the append to
the publisher's outbox, so the outbox order is the order things happened in."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
from collections.abc import Callable

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from shim import cgroups
from shim.api.containerd.events import task_pb2 as events
from shim.api.containerd.runc.v1 import options_pb2
from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.api.containerd.types import task_pb2 as types
from shim.container import Container, runtime_error
from shim.options import RuncOptions, from_any, reads_a_file
from shim.process import Process, State, Stdio
from shim.reaper import Reaper
from shim.runc import RuncError
from shim.stdio import ProcessIO
from shim.ttrpc import Code, Method, ServerContext, TTRPCError

log = logging.getLogger("pyrunc.service")

EMPTY = empty_pb2.Empty()
STATUS = {
    State.CREATED: types.CREATED, State.RUNNING: types.RUNNING, State.PAUSED: types.PAUSED,
    State.STOPPED: types.STOPPED, State.DELETED: types.UNKNOWN,
}


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def to_any(msg) -> any_pb2.Any:
    """containerd's typeurl wants the bare full name as type_url."""
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


CHECKPOINT_OPTIONS = options_pb2.CheckpointOptions.DESCRIPTOR.full_name


def checkpoint_options(msg: any_pb2.Any) -> options_pb2.CheckpointOptions:
    """CheckpointTaskRequest.options: containerd.runc.v1.CheckpointOptions, or nothing for the defaults
    (containerd sends nothing to a runtime whose name is not io.containerd.runc.*)."""
    if not msg.type_url and not msg.value:
        return options_pb2.CheckpointOptions()
    kind = msg.type_url.rsplit("/", 1)[-1]
    if kind != CHECKPOINT_OPTIONS:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"checkpoint options must be {CHECKPOINT_OPTIONS}, not {kind!r}")
    try:
        return options_pb2.CheckpointOptions.FromString(msg.value)
    except DecodeError as e:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid {CHECKPOINT_OPTIONS}: {e}") from e


_ERRNO_CODES = {
    errno.ENOENT: Code.NOT_FOUND, errno.EACCES: Code.PERMISSION_DENIED, errno.EPERM: Code.PERMISSION_DENIED,
    errno.EINVAL: Code.INVALID_ARGUMENT, errno.ENAMETOOLONG: Code.INVALID_ARGUMENT,
    errno.ENOTDIR: Code.INVALID_ARGUMENT, errno.EISDIR: Code.INVALID_ARGUMENT, errno.ENXIO: Code.FAILED_PRECONDITION,
}


# Each Task method's request class, looked up once per process (the zygote's, when there is one).
_REQUEST_TYPES = {m.name: getattr(api, m.input_type.name) for m in api.DESCRIPTOR.services_by_name["Task"].methods}


def _os_errors(handler):
    """An OSError that escapes a handler (a bad stdio path, say) becomes a clear error with a fitting code.

    Only paths the caller gave get here: failures with the shim's own files (pid files, options.json)
    are TTRPCErrors where they happen, so a missing one of those never reads as the caller's NotFound."""
    # Not functools.wraps' defaults: those make the handler's __annotations__ and __dict__ (its function's,
    # made on first access), a write to the zygote's pages in every server.
    @functools.wraps(handler, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    async def wrapped(ctx: ServerContext, req):
        try:
            return await handler(ctx, req)
        except OSError as e:
            where = f" {e.filename}" if e.filename else ""
            code = _ERRNO_CODES.get(e.errno, Code.INTERNAL)
            raise TTRPCError(code, f"{ctx.method}:{where}: {e.strerror or e}") from e
    return wrapped


class TaskService:
    def __init__(self, namespace: str, reaper: Reaper, publish: Callable[[object], None],
                 default_options: RuncOptions, on_empty_shutdown: Callable[[], None]) -> None:
        self.namespace = namespace
        self.reaper = reaper
        self.publish = publish
        self.default_options = default_options
        self.on_empty_shutdown = on_empty_shutdown
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self.cgroups: dict[str, cgroups.Cgroup] = {}
        self.oom = cgroups.OOMWatcher()

    def methods(self) -> dict[str, Method]:
        return {name: Method(_os_errors(getattr(self, name)), request) for name, request in _REQUEST_TYPES.items()}

    def container(self, id: str) -> Container:
        c = self.containers.get(id)
        if c is None:
            raise TTRPCError(Code.NOT_FOUND, f"container {id}: not found")
        return c

    def process(self, id: str, exec_id: str) -> tuple[Container, Process]:
        c = self.container(id)
        return c, c.process(exec_id)

    # -- lifecycle ---------------------------------------------------------------------------
    async def Create(self, ctx: ServerContext, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        if req.id in self.containers or req.id in self._creating:
            raise TTRPCError(Code.ALREADY_EXISTS, f"container {req.id}: already exists")
        self._creating.add(req.id)
        try:
            options = self.default_options
            if req.HasField("options"):
                # A config file is read in a thread (blocking I/O); a thread costs the server memory,
                # so not for the runc Options CRI and ctr send.
                options = await asyncio.to_thread(from_any, req.options) if reads_a_file(req.options) \
                    else from_any(req.options)
            c = await Container.create(req, self.namespace, self.reaper, options, self._exited)
        finally:
            self._creating.discard(req.id)
        self.containers[req.id] = c
        if c.init.pid:  # none yet when it is restored from a checkpoint at Start
            self._find_cgroup(c)
        self.publish(events.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=req.rootfs, checkpoint=req.checkpoint,
            io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
            pid=c.init.pid))
        if c.init.pid:
            c.monitor(c.init)
        return api.CreateTaskResponse(pid=c.init.pid)

    def _find_cgroup(self, c: Container) -> cgroups.Cgroup | None:
        """The container's cgroup, found once from its init (runc init already sits in its final one)."""
        if c.id not in self.cgroups:
            try:
                self.cgroups[c.id] = cgroups.find(c.init.pid)
            except (cgroups.CgroupError, OSError, ValueError) as e:  # stats and OOM events go, not the task
                log.warning("container %s: no cgroup: %s", c.id, e)
        return self.cgroups.get(c.id)

    async def Start(self, ctx: ServerContext, req: api.StartRequest) -> api.StartResponse:
        c, p = self.process(req.id, req.exec_id)
        if p.is_init and c.restore_from is None:
            # Shielded, as the Go shim finishes a Start whose caller hung up: once `runc start` ran the
            # init is running, and must be recorded so and announced. (An exec or a restore whose caller
            # hangs up is undone instead: Container._launch.)
            return await asyncio.shield(self._start(c, p))
        return await self._start(c, p)

    async def _start(self, c: Container, p: Process) -> api.StartResponse:
        await c.start(p)
        try:
            if p.is_init:
                if (cg := self._find_cgroup(c)) is not None:
                    try:
                        self.oom.add(c.id, cg, self._oom)
                    except Exception as e:  # an OOM watch is worth a log line, never a failed Start
                        log.error("container %s: add cgroup to OOM monitor: %s", c.id, e)
                self.publish(events.TaskStart(container_id=c.id, pid=p.pid))
            else:
                self.publish(events.TaskExecStarted(container_id=c.id, exec_id=p.id, pid=p.pid))
        finally:
            p.not_starting.set()  # an exit seen meanwhile may now follow the start event
        return api.StartResponse(pid=p.pid)

    def _oom(self, container_id: str) -> None:
        self.publish(events.TaskOOM(container_id=container_id))

    def _exited(self, c: Container, p: Process) -> None:
        if p.state is State.DELETED:
            return  # deleted before it was ever started: containerd already has its answer
        self.oom.flush(c.id)  # an OOM that caused this exit is published before it (CRI reads OOMKilled)
        self.publish(events.TaskExit(container_id=c.id, id=p.id, pid=p.pid, exit_status=p.exit_status,
                                     exited_at=timestamp(p.exited_at_ns)))

    async def Delete(self, ctx: ServerContext, req: api.DeleteRequest) -> api.DeleteResponse:
        c, p = self.process(req.id, req.exec_id)
        # Shielded: a caller that hangs up mid-way must not leave a half-deleted container behind.
        await asyncio.shield(self._delete(c, p))
        exited_at = timestamp(p.exited_at_ns)
        return api.DeleteResponse(pid=p.pid, exit_status=p.exit_status, exited_at=exited_at)

    async def _delete(self, c: Container, p: Process) -> None:
        await c.delete(p)
        if p.is_init:
            del self.containers[c.id]
            self.oom.remove(c.id)
            self.cgroups.pop(c.id, None)
            self.publish(events.TaskDelete(container_id=c.id, pid=p.pid, exit_status=p.exit_status,
                                           exited_at=timestamp(p.exited_at_ns)))

    async def Exec(self, ctx: ServerContext, req: api.ExecProcessRequest) -> empty_pb2.Empty:
        c = self.container(req.id)
        p = c.add_exec(req.exec_id, Stdio(req.stdin, req.stdout, req.stderr, req.terminal), req.spec.value)
        self.publish(events.TaskExecAdded(container_id=c.id, exec_id=p.id))
        return EMPTY

    async def Kill(self, ctx: ServerContext, req: api.KillRequest) -> empty_pb2.Empty:
        c, p = self.process(req.id, req.exec_id)
        await c.kill(p, req.signal, req.all)
        return EMPTY

    async def Wait(self, ctx: ServerContext, req: api.WaitRequest) -> api.WaitResponse:
        _, p = self.process(req.id, req.exec_id)
        await p.wait()
        return api.WaitResponse(exit_status=p.exit_status, exited_at=timestamp(p.exited_at_ns))

    async def Pause(self, ctx: ServerContext, req: api.PauseRequest) -> empty_pb2.Empty:
        c = self.container(req.id)
        await c.pause()
        self.publish(events.TaskPaused(container_id=c.id))
        return EMPTY

    async def Resume(self, ctx: ServerContext, req: api.ResumeRequest) -> empty_pb2.Empty:
        c = self.container(req.id)
        await c.resume()
        self.publish(events.TaskResumed(container_id=c.id))
        return EMPTY

    # -- inspection --------------------------------------------------------------------------
    async def State(self, ctx: ServerContext, req: api.StateRequest) -> api.StateResponse:
        c, p = self.process(req.id, req.exec_id)
        s = p.stdio
        return api.StateResponse(
            id=p.id, bundle=c.bundle, pid=p.pid, status=STATUS[p.state], stdin=s.stdin, stdout=s.stdout,
            stderr=s.stderr, terminal=s.terminal, exit_status=p.exit_status,
            exited_at=timestamp(p.exited_at_ns) if p.exited else None, exec_id=p.exec_id)

    async def Pids(self, ctx: ServerContext, req: api.PidsRequest) -> api.PidsResponse:
        c = self.container(req.id)
        exec_by_pid = {e.pid: e.id for e in c.execs.values() if e.pid}
        infos = []
        for pid in await c.pids():
            info = types.ProcessInfo(pid=pid)
            if pid in exec_by_pid:
                info.info.CopyFrom(to_any(options_pb2.ProcessDetails(exec_id=exec_by_pid[pid])))
            infos.append(info)
        return api.PidsResponse(processes=infos)

    async def Connect(self, ctx: ServerContext, req: api.ConnectRequest) -> api.ConnectResponse:
        c = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0)

    async def CloseIO(self, ctx: ServerContext, req: api.CloseIORequest) -> empty_pb2.Empty:
        _, p = self.process(req.id, req.exec_id)
        if req.stdin and p.io is not None:
            p.io.close_stdin()
        return EMPTY

    async def Shutdown(self, ctx: ServerContext, req: api.ShutdownRequest) -> empty_pb2.Empty:
        if not self.containers and not self._creating:
            self.on_empty_shutdown()
        return EMPTY

    async def ResizePty(self, ctx: ServerContext, req: api.ResizePtyRequest) -> empty_pb2.Empty:
        _, p = self.process(req.id, req.exec_id)
        if not isinstance(p.io, ProcessIO) or not p.io.terminal:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"process {p.id} has no terminal")
        p.io.resize(req.width, req.height)
        return EMPTY

    async def Checkpoint(self, ctx: ServerContext, req: api.CheckpointTaskRequest) -> empty_pb2.Empty:
        c = self.container(req.id)
        image = await c.checkpoint(req.path, checkpoint_options(req.options))
        # Not sent by the Go v2 shim; containerd's v1 shim did, and the topic is containerd's.
        self.publish(events.TaskCheckpointed(container_id=c.id, checkpoint=image))
        c.init.not_starting.set()  # an exit the checkpoint caused (exit=true) may now follow the event
        return EMPTY

    async def Update(self, ctx: ServerContext, req: api.UpdateTaskRequest) -> empty_pb2.Empty:
        """Resources (OCI LinuxResources JSON) go to ``runc update``; annotations are accepted as the
        Go shim does, with nothing to apply them to."""
        c = self.container(req.id)
        c.init.check("update")
        try:
            if not isinstance(json.loads(req.resources.value or b"null"), dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"resources must be OCI LinuxResources JSON: {e}") from e
        try:
            await c.runc.update(c.id, req.resources.value)
        except RuncError as e:
            raise runtime_error("update", e) from e
        return EMPTY

    async def Stats(self, ctx: ServerContext, req: api.StatsRequest) -> api.StatsResponse:
        self.container(req.id)
        cg = self.cgroups.get(req.id)
        if cg is None:
            raise TTRPCError(Code.NOT_FOUND, "cgroup does not exist")
        try:
            return api.StatsResponse(stats=cgroups.stats(cg))
        except cgroups.CgroupError as e:
            raise TTRPCError(Code.NOT_FOUND, str(e)) from e
        except ValueError as e:  # the kernel's file, not the request, is what did not parse
            raise TTRPCError(Code.INTERNAL, f"cannot parse the cgroup's statistics: {e}") from e
