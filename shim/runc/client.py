"""An async client for the runc command line: one method per verb, arguments as go-runc passes them."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shim import tmp
from shim.reaper import DEVNULL, PIPE, Reaper
from shim.runc._capture import Capture, data_fd
from shim.runc.errors import RuncError, last_log_error, log_offset


@dataclass(frozen=True)
class CriuOptions:
    """What checkpoint and restore share (go-runc's CheckpointOpts)."""

    image_path: str
    work_path: str = ""
    parent_path: str = ""
    tcp_established: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    cgroups_mode: str = ""
    empty_namespaces: tuple[str, ...] = ()

    def args(self) -> list[str]:
        out = ["--image-path", self.image_path]
        if self.work_path:
            out += ["--work-path", self.work_path]
        if self.parent_path:
            out += ["--parent-path", self.parent_path]
        out += [flag for flag, on in (("--tcp-established", self.tcp_established), ("--ext-unix-sk", self.ext_unix_sk),
                                      ("--shell-job", self.shell_job), ("--file-locks", self.file_locks)) if on]
        if self.cgroups_mode:
            out += ["--manage-cgroups-mode", self.cgroups_mode]
        for ns in self.empty_namespaces:
            out += ["--empty-ns", ns]
        return out


class Runc:
    """Runs ``binary`` (runc, crun, or a path) with the global flags of one runc root and log.

    Every invocation is a child of the shim's :class:`Reaper`; nothing here waits for a process itself.
    Cancelling a call does not kill runc: a half-done runc command is worse than a finished one whose
    result nobody reads, and the reaper still collects it.
    """

    def __init__(self, reaper: Reaper, binary: str = "runc", *, root: str | None = None,
                 log: str | None = None, systemd_cgroup: bool = False, criu: str | None = None) -> None:
        self.reaper = reaper
        self.binary = binary
        self.root = root
        self.log = log
        self.systemd_cgroup = systemd_cgroup
        self._path: str | None = None
        self._global: list[str] = []
        if root:
            self._global += ["--root", root]
        if log:
            self._global += ["--log", log, "--log-format", "json"]
        if systemd_cgroup:
            self._global.append("--systemd-cgroup")
        if criu:
            self._global += ["--criu", criu]

    # -- verbs -------------------------------------------------------------------------------------

    async def create(self, id: str, bundle: str, *, pid_file: str, console_socket: str | None = None,
                     no_pivot: bool = False, no_new_keyring: bool = False, stdin: int | None = None,
                     stdout: int | None = None, stderr: int | None = None) -> None:
        """``runc create``; without a terminal the container inherits ``stdin/stdout/stderr`` (fds)."""
        args = ["--bundle", bundle, "--pid-file", os.path.abspath(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self._run("create", [*args, id], **_process_stdio(console_socket, stdin, stdout, stderr))

    async def start(self, id: str) -> None:
        await self._run("start", [id])

    async def exec(self, id: str, process_json: bytes, *, pid_file: str, console_socket: str | None = None,
                   detach: bool = True, stdin: int | None = None, stdout: int | None = None,
                   stderr: int | None = None) -> None:
        """``runc exec`` of an OCI process spec (JSON), passed to runc in a temporary file."""
        spec_path = _write_spec(process_json)
        try:
            args = ["--process", spec_path]
            if console_socket:
                args += ["--console-socket", console_socket]
            if detach:
                args.append("--detach")
            args += ["--pid-file", os.path.abspath(pid_file), id]
            await self._run("exec", args, **_process_stdio(console_socket, stdin, stdout, stderr))
        finally:
            os.unlink(spec_path)

    async def checkpoint(self, id: str, opts: CriuOptions, *, leave_running: bool = True) -> None:
        """``runc checkpoint`` (criu dump) into ``opts.image_path``."""
        await self._run("checkpoint", [*opts.args(), *(["--leave-running"] if leave_running else []), id])

    async def restore(self, id: str, bundle: str, opts: CriuOptions, *, pid_file: str,
                      console_socket: str | None = None, no_pivot: bool = False, stdin: int | None = None,
                      stdout: int | None = None, stderr: int | None = None) -> None:
        """``runc restore --detach`` from ``opts.image_path``; the restored process is reparented to us
        (``--no-subreaper``: runc must not wait for it, the shim's reaper does)."""
        args = [*opts.args(), "--detach", "--pid-file", os.path.abspath(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        args += ["--no-subreaper", "--bundle", bundle, id]
        await self._run("restore", args, **_process_stdio(console_socket, stdin, stdout, stderr))

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        await self._run("kill", [*(["--all"] if all else []), id, str(int(signal))])

    async def delete(self, id: str, force: bool = False) -> None:
        await self._run("delete", [*(["--force"] if force else []), id])

    async def pause(self, id: str) -> None:
        await self._run("pause", [id])

    async def resume(self, id: str) -> None:
        await self._run("resume", [id])

    async def ps(self, id: str) -> list[int]:
        """The pids of the container's processes."""
        out = await self._run("ps", ["--format", "json", id])
        # runc prints null, not [], for a container without processes.
        return [int(pid) for pid in json.loads(out) or ()]

    async def state(self, id: str) -> dict[str, Any]:
        """runc's state of the container (id, pid, status, bundle, …)."""
        state = json.loads(await self._run("state", [id]))
        if not isinstance(state, dict):
            raise ValueError(f"unexpected runc state output: {state!r}")
        return state

    async def update(self, id: str, resources_json: bytes) -> None:
        """``runc update --resources -`` with an OCI LinuxResources JSON on stdin."""
        await self._run("update", ["--resources", "-", id], input=resources_json)

    # -- running -----------------------------------------------------------------------------------

    def argv(self, command: str, args: Sequence[str]) -> list[str]:
        """The full command line for ``command``: global flags first, then the verb and its args."""
        if self._path is None:
            self._path = _resolve(self.binary)
        return [self._path, *self._global, command, *args]

    async def _run(self, command: str, args: Sequence[str], *, stdin: int | None = DEVNULL,
                   stdout: int | None = PIPE, stderr: int | None = PIPE,
                   input: bytes | None = None) -> bytes:
        argv = self.argv(command, args)
        offset = log_offset(self.log)
        in_fd = data_fd(input) if input is not None else None
        try:
            child = self.reaper.spawn(argv, stdin=stdin if in_fd is None else in_fd, stdout=stdout,
                                      stderr=stderr, env=_env())
        except FileNotFoundError:
            raise RuncError(command, argv, 127, f"{self.binary}: executable file not found: install runc "
                            "(apt-get install runc) or set binary_name in pyrunc's runtime config") from None
        finally:
            if in_fd is not None:
                os.close(in_fd)
        loop = asyncio.get_running_loop()
        out, err = Capture(loop, child.stdout), Capture(loop, child.stderr)
        try:
            status = await child.wait()
        finally:
            output, errput = out.finish(), err.finish()
        if status != 0:
            message = last_log_error(self.log, offset) if self.log else ""
            message = message or errput.decode(errors="replace").strip() \
                or output.decode(errors="replace").strip()
            raise RuncError(command, argv, status, message)
        return output


def _process_stdio(console_socket: str | None, stdin: int | None, stdout: int | None,
                   stderr: int | None) -> dict[str, int | None]:
    # Without a terminal the container's process inherits runc's stdio. It must never get one of our
    # capture pipes: we stop reading them when runc exits, and its writes would then fail (EPIPE).
    # Errors still reach us through the log file. With a terminal the process gets the pty instead.
    default = PIPE if console_socket else DEVNULL
    return {
        "stdin": DEVNULL if stdin is None else stdin,
        "stdout": default if stdout is None else stdout,
        "stderr": default if stderr is None else stderr,
    }


def _write_spec(process_json: bytes) -> str:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    path, fd = tmp.create("runc-process", ".json", lambda path: os.open(path, flags, 0o600))  # as go-runc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(process_json)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _resolve(binary: str) -> str:
    # Resolve once: posix_spawnp would search PATH again on every call.
    if "/" in binary:
        return binary
    for directory in os.get_exec_path():
        path = os.path.join(directory, binary)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return binary  # let the spawn report that it is missing


def _env() -> dict[str, str] | None:
    # NOTIFY_SOCKET makes runc talk to systemd's notify socket; it is only meant for units run by systemd.
    if "NOTIFY_SOCKET" not in os.environ:
        return None
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
