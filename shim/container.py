"""A container: its bundle, rootfs mounts, runc, its init process and its execs.

Exit handling lives here because its order is subtle. For each process one monitor task awaits the
reaper's exit status, then: waits while a Start for it is in flight (an exit racing Start is
reported after the start event, containerd#7111); for the init, waits for the running execs' exits
(an exec's exit comes before its init's, containerd#9719/#10589); then records the exit and calls
``on_exit`` synchronously so the service appends TaskExit at the moment the state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable

from shim import mount
from shim.api.containerd.runc.v1 import options_pb2
from shim.options import RuncOptions
from shim.process import Process, State, Stdio
from shim.reaper import Reaper
from shim.runc import CriuOptions, Runc, RuncError
from shim.stdio import ProcessIO
from shim.ttrpc import Code, TTRPCError

log = logging.getLogger("pyrunc.container")

ExitCallback = Callable[["Container", Process], None]
_VALID_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
EXEC_DRAIN_TIMEOUT = 10.0  # bound on waiting for execs after init died; they are SIGKILLed by then


def check_id(kind: str, value: str) -> None:
    """Ids become file names in the bundle and runc's root: refuse anything that could escape."""
    if not _VALID_ID.fullmatch(value):  # fullmatch: "$" would let a trailing newline through
        raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid {kind} {value!r}: must match {_VALID_ID.pattern}")


def runtime_error(verb: str, err: RuncError | OSError) -> TTRPCError:
    """runc failures as the Go shim words them ("OCI runtime create failed: …", code Unknown)."""
    if isinstance(err, RuncError) and err.not_found:
        return TTRPCError(Code.NOT_FOUND, f"OCI runtime {verb} failed: {err.message}")
    message = err.message if isinstance(err, RuncError) else str(err)
    return TTRPCError(Code.UNKNOWN, f"OCI runtime {verb} failed: {message}")


_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(coro) -> None:
    """Run ``coro`` to the end whatever happens to the caller (referenced until done)."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _read_pid(path: str, verb: str) -> int:
    """The pid runc wrote to the pid file the shim named. A missing or garbled one is the runtime's
    failure, never the caller's (a missing init.pid is no NotFound): Unknown, worded as Go's."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        if pid <= 0:  # 0 or -1 would make a kill signal our own group or everything
            raise ValueError(f"{pid} is not a process id")
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TTRPCError(Code.UNKNOWN, f"OCI runtime {verb} failed: bad pid file {path}: {reason}") from e
    return pid


class Container:
    def __init__(self, id: str, bundle: str, namespace: str, runc: Runc, reaper: Reaper, options: RuncOptions,
                 init: Process, on_exit: ExitCallback) -> None:
        self.id = id
        self.bundle = bundle
        self.namespace = namespace
        self.runc = runc
        self.reaper = reaper
        self.options = options
        self.init = init
        self.execs: dict[str, Process] = {}
        self.on_exit = on_exit
        self.rootfs_mounted = False
        self.kill_all_on_exit = _shares_pid_namespace(bundle)
        # Set while the container waits to be restored from a checkpoint: runc knows nothing of it
        # until Start runs ``runc restore`` (as the Go shim's createdCheckpointState).
        self.restore_from: CriuOptions | None = None
        self._starting_execs = 0
        self._monitors: set[asyncio.Task[None]] = set()

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    async def create(cls, req, namespace: str, reaper: Reaper, options: RuncOptions,
                     on_exit: ExitCallback) -> Container:
        check_id("container id", req.id)
        bundle = req.bundle
        if not os.path.isabs(bundle) or not os.path.isfile(os.path.join(bundle, "config.json")):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"bundle {bundle!r} has no config.json")
        runc = Runc(reaper, options.binary_name or "runc", root=options.runc_root(namespace),
                    log=os.path.join(bundle, "log.json"), systemd_cgroup=options.systemd_cgroup,
                    criu=options.criu_path or None)
        init = Process(req.id, req.id, Stdio(req.stdin, req.stdout, req.stderr, req.terminal), is_init=True)
        container = cls(req.id, bundle, namespace, runc, reaper, options, init, on_exit)
        options.save(bundle)
        container._mount_rootfs(req.rootfs)
        created = False
        try:
            init.io = pio = await ProcessIO.open(init.stdio, reaper=reaper, namespace=namespace, process_id=req.id,
                                                 io_uid=options.io_uid, io_gid=options.io_gid)
            if req.checkpoint:
                # Restored at Start, as Go does: no process exists before then (the pid stays 0).
                container.restore_from = CriuOptions(req.checkpoint, work_path=options.criu_work_path,
                                                     parent_path=req.parent_checkpoint)
                return container
            pid_file = os.path.join(bundle, "init.pid")
            try:
                await runc.create(req.id, bundle, pid_file=pid_file, no_pivot=options.no_pivot_root,
                                  no_new_keyring=options.no_new_keyring, **pio.runc_io())
            except (RuncError, OSError) as e:
                raise runtime_error("create", e) from e
            created = True
            await pio.start()  # with a terminal: receives the pty master runc sent
            init.pid = _read_pid(pid_file, "create")
        except BaseException:
            if init.io is not None:
                init.io.close()
            if created:  # runc made a container nobody will own: remove it, even if our caller is gone
                _background(container._forget_runc_container())
            else:
                container._unmount_rootfs()
            raise
        return container

    async def _forget_runc_container(self) -> None:
        try:
            await self.runc.delete(self.id, force=True)
        except (RuncError, OSError) as e:
            log.warning("container %s: cleanup after a failed create: %s", self.id, e)
        self._unmount_rootfs()

    def _mount_rootfs(self, mounts) -> None:
        if not mounts:
            return
        target = os.path.join(self.bundle, "rootfs")
        os.makedirs(target, mode=0o711, exist_ok=True)
        try:
            for m in mounts:
                mount.mount(m.type, m.source, target, list(m.options))
                self.rootfs_mounted = True
        except OSError as e:
            self._unmount_rootfs()
            raise TTRPCError(Code.UNKNOWN, f"failed to mount rootfs component: {e}") from e

    def _unmount_rootfs(self) -> None:
        if self.rootfs_mounted:
            try:
                mount.unmount_all(os.path.join(self.bundle, "rootfs"))
                self.rootfs_mounted = False
            except OSError as e:
                log.warning("unmount rootfs of %s: %s", self.id, e)

    # -- processes --------------------------------------------------------------------------------
    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise TTRPCError(Code.NOT_FOUND, f"process {exec_id} does not exist")
        return p

    def add_exec(self, exec_id: str, stdio: Stdio, spec: bytes) -> Process:
        check_id("exec id", exec_id)
        if exec_id in self.execs:
            raise TTRPCError(Code.ALREADY_EXISTS, f"id {exec_id}: already exists")
        if self.init.state not in (State.CREATED, State.RUNNING):
            raise TTRPCError(Code.FAILED_PRECONDITION, f"cannot exec in a {self.init.state.value} state")
        if self.restore_from is not None:
            raise TTRPCError(Code.FAILED_PRECONDITION, "cannot exec in a container not yet restored")
        try:
            json.loads(spec)
        except ValueError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"exec spec is not valid JSON: {e}") from e
        p = Process(exec_id, self.id, stdio, is_init=False)
        p.spec = spec
        self.execs[exec_id] = p
        return p

    async def start(self, p: Process) -> None:
        """Start a process. Its monitor holds back its exit until ``p.not_starting`` is set again,
        which the service does once the start event is in the outbox."""
        p.check("start")
        if not p.not_starting.is_set():  # a Start (or checkpoint) in flight: a second one would race it
            raise TTRPCError(Code.FAILED_PRECONDITION, f"process {p.id} is being started")
        if not p.is_init and self.init.exited:
            raise TTRPCError(Code.FAILED_PRECONDITION, "container's init process has exited")
        p.not_starting.clear()
        if p.is_init and self.restore_from is None:  # a created init: monitored since Create
            try:
                await self.runc.start(self.id)
            except BaseException as e:
                p.not_starting.set()
                if isinstance(e, RuncError | OSError):
                    raise runtime_error("start", e) from e
                raise
            p.transition("start")
            return
        await self._launch(p)

    async def _launch(self, p: Process) -> None:
        """Exec or restore ``p``. Once runc ran, a process exists that only we know of: the work goes on
        in a task of its own even if our caller goes away, and a failure undoes it (kills the process).
        A caller gone by the end is treated as a failure too: nobody would ever be told of the process.
        Until it is all settled the process counts as being started (a Start or Delete meanwhile is
        refused, an init's exit waits for an exec)."""
        if not p.is_init:
            self._starting_execs += 1
            try:  # nothing runs yet: a caller going away here just stops it (open cleans up after itself)
                p.io = await ProcessIO.open(p.stdio, reaper=self.reaper, namespace=self.namespace,
                                            process_id=p.id, is_init=False, io_uid=self.options.io_uid,
                                            io_gid=self.options.io_gid)
            except BaseException:
                self._launch_ended(p)
                raise
        launch = asyncio.get_running_loop().create_task(self._restore(p) if p.is_init else self._exec(p))
        try:
            await asyncio.shield(launch)
        except asyncio.CancelledError:
            _background(self._abandon(p, launch))
            raise
        except BaseException:
            self._launch_ended(p)
            raise
        # Started: from here to the monitor there is no await, so no caller can go away in between.
        self._launch_ended(p, started=True)
        if p.is_init:
            self.restore_from = None
        p.transition("start")
        self.monitor(p)

    def _launch_ended(self, p: Process, started: bool = False) -> None:
        if not p.is_init:
            self._starting_execs -= 1
        if not started:
            p.not_starting.set()

    async def _abandon(self, p: Process, launch: asyncio.Task[None]) -> None:
        """The Start that launched ``p`` went away: let the launch finish, then undo what it started."""
        try:
            await launch
        except (Exception, asyncio.CancelledError):
            pass  # it failed, and undid itself
        else:
            log.warning("container %s: %s %s started after its caller went away: killing it", self.id,
                        "init" if p.is_init else "exec", p.id)
            if p.is_init:
                await self._undo_restore(p)
            else:
                self._undo_exec(p, ran=True)
        finally:
            self._launch_ended(p)

    async def _restore(self, p: Process) -> None:
        """``runc restore --detach`` with the process's stdio; criu's restored init becomes our child
        when runc exits (``--no-subreaper``), so the reaper collects it like any other."""
        assert self.restore_from is not None and isinstance(p.io, ProcessIO)
        pid_file = os.path.join(self.bundle, "init.pid")
        try:
            await self.runc.restore(self.id, self.bundle, self.restore_from, pid_file=pid_file,
                                    no_pivot=self.options.no_pivot_root, **p.io.runc_io())
        except (RuncError, OSError) as e:
            raise runtime_error("restore", e) from e
        try:
            p.pid = _read_pid(pid_file, "restore")
            await p.io.start()  # with a terminal: receives the pty master runc sent
        except BaseException:
            await self._undo_restore(p)
            raise

    async def _undo_restore(self, p: Process) -> None:
        """A restore that failed (or lost its caller) after runc restored the container: kill it and
        remove it from runc, so the container is as before Start: created, to restore again or delete."""
        pid, p.pid = p.pid, 0
        if pid:
            self._kill_unreported(pid)
        try:
            await self.runc.delete(self.id, force=True)  # also kills it when its pid is unknown
        except (RuncError, OSError) as e:
            log.warning("container %s: cleanup after a failed restore: %s", self.id, e)

    async def _exec(self, p: Process) -> None:
        """``runc exec --detach`` with the process's stdio; a failure closes that, and from runc's success
        on kills the process again (see :meth:`_undo_exec`)."""
        pio = p.io
        assert isinstance(pio, ProcessIO)
        pid_file = os.path.join(self.bundle, f"{p.id}.pid")
        ran = False
        try:
            try:
                await self.runc.exec(self.id, p.spec, pid_file=pid_file, detach=True, **pio.runc_io())
            except (RuncError, OSError) as e:
                raise runtime_error("exec", e) from e
            ran = True
            p.pid = _read_pid(pid_file, "exec")
            await pio.start()  # with a terminal: receives the pty master runc sent
        except BaseException:
            self._undo_exec(p, ran)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)

    def _undo_exec(self, p: Process, ran: bool) -> None:
        """An exec that failed (or lost its caller): kill its process if runc made one, close its I/O,
        and leave the exec as never started (pid 0), so Delete works and a Wait ends with it."""
        pid, p.pid = p.pid, 0
        if pid:
            self._kill_unreported(pid)
        elif ran:  # runc gives no way to signal an exec'd process but by its pid
            log.error("container %s: exec %s may be left running: runc's pid file gave no pid", self.id, p.id)
        if p.io is not None:
            p.io.close()
            p.io = None

    def _kill_unreported(self, pid: int) -> None:
        """SIGKILL a process whose start failed, and claim its exit from the reaper (no monitor will)."""
        exited = self.reaper.wait_for(pid)
        if not exited.done():  # not reaped yet, so the pid is still that process's own
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def monitor(self, p: Process) -> None:
        task = asyncio.get_running_loop().create_task(self._monitor(p))
        self._monitors.add(task)
        task.add_done_callback(self._monitors.discard)

    async def _monitor(self, p: Process) -> None:
        status = await self.reaper.wait_for(p.pid)
        p.reaped = True  # the pid is free for reuse from now on: Kill must not signal it any more
        await p.not_starting.wait()
        if p.io is not None:
            await p.io.drain(timeout=2.0)
        if p.is_init:
            if self.kill_all_on_exit:
                with contextlib.suppress(RuncError, OSError):
                    await self.runc.kill(self.id, signal.SIGKILL, all=True)
            await self._drain_execs()
            self._persist_exit(status)
        p.set_exited(status)
        if p.io is not None:
            p.io.close_stdin()
        self.on_exit(self, p)

    async def _drain_execs(self) -> None:
        """Wait until no exec is starting and every started exec's exit was recorded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXEC_DRAIN_TIMEOUT
        while loop.time() < deadline:
            running = [e for e in self.execs.values() if e.pid and not e.exited]
            if not running and not self._starting_execs:
                return
            waits = [asyncio.ensure_future(e.wait()) for e in running]
            await asyncio.wait(waits or [asyncio.ensure_future(asyncio.sleep(0.01))], timeout=0.05)
            for w in waits:
                w.cancel()
        log.warning("container %s: execs still running %.0fs after init exited", self.id, EXEC_DRAIN_TIMEOUT)

    def _persist_exit(self, status: int) -> None:
        """For the ``delete`` action, so a crashed shim's exit is reported truly instead of as 137."""
        with contextlib.suppress(OSError):
            with open(os.path.join(self.bundle, "init.exit"), "w") as f:
                f.write(str(status))

    # -- operations -------------------------------------------------------------------------------
    async def kill(self, p: Process, sig: int, all: bool) -> None:
        if not 0 <= sig <= 64:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid signal {sig}")
        if p.is_init:
            if p.state is State.DELETED or (p.exited and not all):
                raise TTRPCError(Code.NOT_FOUND, "process already finished")
            try:
                await self.runc.kill(self.id, sig, all=all)
            except RuncError as e:
                if e.not_running or e.not_found:
                    raise TTRPCError(Code.NOT_FOUND, "process already finished") from e
                raise runtime_error("kill", e) from e
            return
        if not p.pid:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"process {p.id} not created")
        if p.exited or p.reaped:
            raise TTRPCError(Code.NOT_FOUND, "process already finished")
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError as e:
            raise TTRPCError(Code.NOT_FOUND, "process already finished") from e

    async def delete(self, p: Process) -> None:
        p.check("delete")
        if not p.not_starting.is_set():
            raise TTRPCError(Code.FAILED_PRECONDITION, f"process {p.id} is being started")
        if not p.is_init:
            p.transition("delete")
            del self.execs[p.id]
            if p.io is not None:
                await p.io.aclose()  # a logger's exit is waited for, as the Go shim's Delete does
            return
        try:
            await self.runc.delete(self.id, force=False)
        except RuncError as e:
            if not e.not_found:
                raise runtime_error("delete", e) from e
        if p.pid and not p.exited:  # a created, never started init: runc delete just killed it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.wait(), 2)
        p.transition("delete")
        await asyncio.gather(*(q.io.aclose() for q in (p, *self.execs.values()) if q.io is not None))
        self._unmount_rootfs()

    async def pause(self) -> None:
        self.init.check("pause")
        try:
            await self.runc.pause(self.id)
        except RuncError as e:
            raise runtime_error("pause", e) from e
        self.init.transition("pause")

    async def resume(self) -> None:
        self.init.check("resume")
        try:
            await self.runc.resume(self.id)
        except RuncError as e:
            raise runtime_error("resume", e) from e
        self.init.transition("resume")

    async def checkpoint(self, path: str, opts: options_pb2.CheckpointOptions) -> str:
        """``runc checkpoint`` (criu dump) into ``path`` (else ``opts.image_path``), which is returned.

        Without ``opts.exit`` the container keeps running (``--leave-running``); with it runc stops the
        container after the dump and its exit is reported as usual. Either way an exit is held back
        (``not_starting``, as for an exit racing Start) until the service has published the checkpoint
        event, so /tasks/checkpointed comes before /tasks/exit.
        """
        p = self.init
        p.check("checkpoint")
        image = path or opts.image_path
        if not image:
            raise TTRPCError(Code.INVALID_ARGUMENT, "checkpoint needs an image path (request path or options)")
        # criu's work dir holds only its logs: a default one is ours to remove afterwards.
        work = opts.work_path or os.path.join(self.bundle, "criu-work")
        criu = CriuOptions(image, work_path=work, tcp_established=opts.open_tcp,
                           ext_unix_sk=opts.external_unix_sockets, shell_job=opts.terminal,
                           file_locks=opts.file_locks, cgroups_mode=opts.cgroups_mode,
                           empty_namespaces=tuple(opts.empty_namespaces))
        p.not_starting.clear()
        try:
            await self.runc.checkpoint(self.id, criu, leave_running=not opts.exit)
        except BaseException as e:
            p.not_starting.set()
            if isinstance(e, RuncError | OSError):
                raise self._checkpoint_error(e, work) from e
            raise
        finally:
            if not opts.work_path:
                import shutil  # checkpoints only: not in the zygote, which every server shares

                shutil.rmtree(work, ignore_errors=True)
        return image

    def _checkpoint_error(self, err: RuncError | OSError, work: str) -> TTRPCError:
        """As Go: criu's dump.log is kept in the bundle (the work dir may be removed) and named in the
        error; runc's message is cut to its first line, whose second names that work dir's log."""
        reason = (err.message or f"exit status {err.status}") if isinstance(err, RuncError) else str(err)
        first_line = reason.split("\n", 1)[0]
        message = f"OCI runtime checkpoint failed: {first_line}"
        dump_log = os.path.join(self.bundle, "criu-dump.log")
        import shutil

        try:
            shutil.copyfile(os.path.join(work, "dump.log"), dump_log)
        except OSError as e:
            log.warning("container %s: keep criu's dump.log: %s", self.id, e)
            return TTRPCError(Code.UNKNOWN, message)
        return TTRPCError(Code.UNKNOWN, f"{message} path= {dump_log}")

    async def pids(self) -> list[int]:
        if self.init.state is State.DELETED:
            raise TTRPCError(Code.NOT_FOUND, f"container {self.id} is deleted")
        try:
            return await self.runc.ps(self.id)
        except RuncError as e:
            raise runtime_error("ps", e) from e
        except (ValueError, TypeError) as e:  # runc said it succeeded: its output is what is wrong
            raise TTRPCError(Code.INTERNAL, f"runc ps printed no JSON list of pids: {e}") from e


def _shares_pid_namespace(bundle: str) -> bool:
    """True when the container has no pid namespace of its own: its processes outlive init,
    so they are killed when init exits (what the Go shim's ShouldKillAllOnExit decides)."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "pid":
                return bool(ns.get("path"))
    except (OSError, ValueError, AttributeError):
        pass
    return True
