"""Keeping the zygote's servers small (shim/zygote.py): what the zygote does around its freeze.

A server forked from the zygote shares the zygote's memory until either process writes to a page; the
writer gets its own copy of the whole 4 KiB page, for one reference count changed on one object that
lives there. What a server costs is the number of zygote pages it writes, a few thousand, spread over
the zygote's heap. These steps move that writing into the zygote, before the fork (where it is paid
once), or out of the zygote's pages; each was kept for what it saved in servers forked from a real
zygote (``bench/shim_bench.py``'s PSS, and per server the pages that differ from the zygote's).
"""

from __future__ import annotations

import sys

# Imported by the standard library only to offer what a server never uses (asyncio's TLS, shutil's
# bz2/xz archives), each inside a try that handles the ImportError. Kept out, the zygote is ~4.5 MiB
# (resident) smaller: libcrypto and libssl, and the modules.
_OPTIONAL = ("ssl", "bz2", "lzma")


def before_imports() -> None:
    """In the zygote, before it imports the server. Its servers cannot import these modules either."""
    for name in _OPTIONAL:
        sys.modules.setdefault(name, None)


def before_freeze() -> None:
    """In the zygote, after its imports and before ``gc.collect(); gc.freeze()``."""
    # The zygote runs as __main__ (python -m shim.zygote) and each server imports the package module
    # to mark itself forked: the import machinery, run in every server, copied ~0.3 MiB there.
    import shim.zygote  # noqa: F401

    warm_up()


# -- the environment ------------------------------------------------------------------------------
def set_environ(env: dict[str, str]) -> None:
    """Make ``os.environ`` equal to ``env``, touching only the variables that differ.

    ``os.environ.clear(); os.environ.update(env)`` runs the MutableMapping code for every variable and
    frees and reallocates each one (in the server, objects the zygote allocated); while the environment
    asked for is nearly always the zygote's own. Measured: 0.25 MiB less copied per server.
    """
    import os

    environ = os.environ
    data = getattr(environ, "_data", None)  # bytes -> bytes on POSIX: compared without decoding each
    if isinstance(data, dict):
        fsencode = os.fsencode
        wanted = {fsencode(k): fsencode(v) for k, v in env.items()}
        if wanted == data:
            return
        gone = [os.fsdecode(k) for k in data if k not in wanted]
        changed = [os.fsdecode(k) for k, v in wanted.items() if data.get(k) != v]
    else:
        gone = [k for k in environ if k not in env]
        changed = [k for k, v in env.items() if environ.get(k) != v]
    for key in gone:
        del environ[key]
    for key in changed:
        environ[key] = env[key]


# -- warm-up --------------------------------------------------------------------------------------
def warm_up() -> None:
    """Run once, in the zygote, code every server runs: an event loop, ttrpc calls over a unix socket
    (an answer and an error), log lines, a protobuf timestamp. What that work creates or rewrites only
    once (state built lazily, the interpreter's specialised bytecode, type and dict version tags) is then
    in pages the servers share. Measured: 0.25 MiB less copied per server. Best effort."""
    try:
        _warm_up()
    except Exception:  # noqa: BLE001 - an optimisation must never stop the zygote
        pass


def _warm_up() -> None:
    import asyncio
    import logging
    import os
    import socket

    from google.protobuf import timestamp_pb2

    from shim import log as shimlog
    from shim.api.containerd.task.v2 import shim_pb2 as api
    from shim.ttrpc import Client, Code, Server, TTRPCError

    timestamp_pb2.Timestamp().GetCurrentTime()

    # log lines through the shim's handler and formatter, into /dev/null; a logger of its own
    logger = logging.getLogger("pyrunc-warm-up")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = shimlog.FifoHandler(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
    logger.addHandler(handler)
    try:
        logger.info("warm-up", extra={"fields": {"pid": os.getpid()}})
        logger.debug("warm-up %s", "call")
    finally:
        logger.removeHandler(handler)
        handler.close()

    async def state(ctx, req):
        if req.id != "warm-up":
            raise TTRPCError(Code.NOT_FOUND, f"container {req.id}: not found")
        return api.StateResponse(id=req.id, pid=1)

    async def calls() -> None:
        server = Server()
        server.register("containerd.task.v2.Task", {"State": (state, api.StateRequest)})
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"\0pyrunc-warm-up-{os.getpid()}"  # abstract: no file to remove
        try:
            listener.bind(address)
            listener.listen(1)
            await server.start(listener)
        except BaseException:
            listener.close()
            raise
        try:
            client = await Client.connect(address)
            try:
                for cid in ("warm-up", "missing"):
                    try:
                        await client.call("containerd.task.v2.Task", "State", api.StateRequest(id=cid),
                                          api.StateResponse, timeout=5)
                    except TTRPCError:
                        pass
            finally:
                await client.aclose()
        finally:
            await server.shutdown(timeout=1)  # closes the listener too

    asyncio.run(calls())

