"""The long-running shim process that ``start`` forks: subreaper, reaper, publisher, ttrpc server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from shim import cgroups
from shim import log as shimlog
from shim.events import Publisher
from shim.options import from_bytes
from shim.reaper import DEVNULL, Reaper, set_child_subreaper
from shim.runc._capture import data_fd
from shim.service import TaskService
from shim.ttrpc import Server, TTRPCError

if TYPE_CHECKING:
    from shim.cli import ShimArgs

log = logging.getLogger("pyrunc")

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")  # v3 is v2 renamed


def serve(args: ShimArgs, listener: socket.socket, options: bytes,
          go_ahead: Callable[[], bool] | None = None) -> int:
    """Serve until Shutdown. ``go_ahead`` (a zygote's server): asked, once everything else is ready, whether
    to accept on ``listener`` at all; False means ``start`` gave up on this server, which leaves."""
    shimlog.setup(args.bundle, args.debug)
    try:
        set_child_subreaper()
        return asyncio.run(_serve(args, listener, options, go_ahead))
    except Exception:
        log.exception("shim failed")
        return 1


def _inode(path: object) -> int | None:
    try:
        return os.stat(path).st_ino if isinstance(path, str) and path else None
    except OSError:
        return None


async def _serve(args: ShimArgs, listener: socket.socket, options: bytes,
                 go_ahead: Callable[[], bool] | None) -> int:
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install()

    async def spawn_publish(argv: list[str], stdin_data: bytes) -> int:
        fd = data_fd(stdin_data)
        try:
            child = reaper.spawn(argv, stdin=fd, stdout=DEVNULL, stderr=DEVNULL)
        finally:
            os.close(fd)
        return await child.wait()

    publisher = Publisher(args.namespace, args.ttrpc_address, args.address, args.publish_binary, spawn_publish)
    publisher.start()
    done = asyncio.Event()
    try:
        default_options = from_bytes(options)
    except TTRPCError as e:
        log.error("ignoring runtime options from start: %s", e.message)
        default_options = from_bytes(b"")
    if default_options.shim_cgroup:
        cgroups.join(default_options.shim_cgroup)
    service = TaskService(args.namespace, reaper, publisher.publish, default_options, done.set)
    server = Server()
    for name in TASK_SERVICES:
        server.register(name, service.methods())
    if go_ahead is not None and not go_ahead():
        log.info("pyrunc shim not serving: start gave up on it")
        return 0
    await server.start(listener)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    zygote = sys.modules.get("shim.zygote")
    log.info("pyrunc shim serving", extra={"fields": {
        "pid": os.getpid(), "namespace": args.namespace, "zygote": bool(zygote and zygote.FORKED)}})

    path = listener.getsockname()
    ours = _inode(path)
    await done.wait()
    # The socket file goes first, while we still listen: a `start` for the same group from now on
    # binds a new server, and the unlink below can never remove that one's socket (same inode check).
    if ours is not None and _inode(path) == ours:
        with contextlib.suppress(OSError):
            os.unlink(path)
    # In-flight calls (the Shutdown call itself) get their answers before the connection closes.
    await server.shutdown(timeout=2)
    if not await publisher.flush(timeout=5):
        log.warning("exiting with %d undelivered events", publisher.pending)
    await publisher.close()
    service.oom.close()
    reaper.close()
    log.info("pyrunc shim exiting")
    return 0
