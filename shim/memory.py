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


QUICKENING_RUNS = 12


def before_freeze(warm_path: str) -> None:
    """In the zygote, after its imports and before ``gc.collect(); gc.freeze()``. ``warm_path``: a free
    socket name in a root-only directory, for :func:`warm_up`."""
    # The zygote runs as __main__ (python -m shim.zygote) and each server imports the package module
    # to mark itself forked: the import machinery, run in every server, copied ~0.3 MiB there.
    import shim.zygote  # noqa: F401

    pack_code()  # first: the warm-up below then specialises the new copies
    # CPython quickens a function's bytecode (3.11: on its 8th call) and specialises it as it runs; run
    # only once here, each server would do that to the same code, a copied page each. Measured on 3.11:
    # -0.18 MiB per container at 10 (running more of Create's code here as well gained nothing more).
    for _ in range(QUICKENING_RUNS):
        warm_up(warm_path)
    from shim import first_use

    first_use.run_all()


def pack_code() -> int:
    """Lay out the code servers run together (shim/code_layout.py), from the recorded profile, out of fresh
    memory: the allocators' holes are used up first, so the copies come one after the other. Measured on
    3.12: ~300 -> ~100 pages of bytecode written per server, -0.8 MiB private. Best effort."""
    try:
        from shim import code_layout

        hot = code_layout.load_profile()
        if not hot:
            return 0
        drain_malloc_free_lists()  # large code objects: glibc's malloc
        fill_pymalloc_pools()  # code objects of up to 512 bytes: pymalloc
        return code_layout.pack(hot)
    except Exception:  # noqa: BLE001 - an optimisation must never stop the zygote
        return 0


def after_freeze() -> None:
    """In the zygote, after ``gc.freeze()``, before it forks any server. Best effort, as all of this."""
    for step in (immortalize_modules, fill_pymalloc_pools, drain_malloc_free_lists):
        try:
            step()
        except Exception:  # noqa: BLE001, PERF203 - an optimisation must never stop the zygote
            pass


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
def warm_up(path: str) -> None:
    """Run once, in the zygote, code every server runs: an event loop, the reaper's SIGCHLD handler,
    ttrpc calls over a unix socket at ``path`` (an answer and an error; removed after), log lines, a
    protobuf timestamp. What that work creates or rewrites only
    once (state built lazily, the interpreter's specialised bytecode, type and dict version tags) is then
    in pages the servers share. Measured: 0.25 MiB less copied per server. Best effort."""
    try:
        _warm_up(path)
    except Exception:  # noqa: BLE001 - an optimisation must never stop the zygote
        pass


def _warm_up(path: str) -> None:
    import asyncio
    import logging
    import os
    import socket

    from google.protobuf import timestamp_pb2

    from shim import log as shimlog
    from shim import mount
    from shim.api.containerd.task.v2 import shim_pb2 as api
    from shim.reaper import Reaper
    from shim.ttrpc import Client, Code, Server, TTRPCError

    timestamp_pb2.Timestamp().GetCurrentTime()
    mount.libc()

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
        reaper = Reaper()
        reaper.install()
        reaper.close()
        server = Server()
        server.register("containerd.task.v2.Task", {"State": (state, api.StateRequest)})
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)  # never an abstract socket (CVE-2020-15257): a path only root can reach
        except BaseException:
            listener.close()
            raise
        try:
            listener.listen(1)
            await server.start(listener)
            client = await Client.connect(path)
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
            os.unlink(path)
            await server.shutdown(timeout=1)  # closes the listener too

    asyncio.run(calls())


# -- allocators -----------------------------------------------------------------------------------
def _captured(fd: int, write) -> str:
    """What ``write`` (a C function given a file descriptor's worth of output) wrote, via a memfd."""
    import os

    out = os.memfd_create("pyrunc-memory", os.MFD_CLOEXEC)
    try:
        write(out)
        os.lseek(out, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(out, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    finally:
        os.close(out)


_FILLERS: list[object] = []  # objects that fill the pools' free blocks; never freed


def _pymalloc_free_blocks() -> dict[int, int]:
    """Free blocks per pymalloc block size (bytes) in the pools in use, from ``sys._debugmallocstats``
    (written to the C stderr); empty when that is not there (another allocator or interpreter)."""
    import os

    debug = getattr(sys, "_debugmallocstats", None)
    if debug is None:
        return {}

    def write(fd: int) -> None:
        saved = os.dup(2)
        try:
            os.dup2(fd, 2)
            debug()
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    text = _captured(2, write)
    free = {}
    for line in text.split("# arenas", 1)[0].splitlines():
        fields = line.split()  # class, size, pools, blocks in use, available blocks
        if len(fields) == 5 and all(f.isdigit() for f in fields):
            free[int(fields[1])] = int(fields[4])
    return free


def fill_pymalloc_pools() -> None:
    """Use up, for good, the free blocks of the zygote's partly used pymalloc pools.

    A server's new small objects would otherwise go first into those holes, one here and one there over
    hundreds of the zygote's pages (each a page copy, plus the pool's header page); filled, they go to
    fresh pools of the server's own. Measured: 0.15 MiB less copied per server, for ~0.5 MiB more in
    the zygote."""
    half = 0.5
    for _ in range(2):  # the first round's own temporaries (and the lists) open a few holes again
        batch: list[object] = []
        for size, count in _pymalloc_free_blocks().items():
            if size == 16:
                batch += [object() for _ in range(count)]
            elif size == 32:
                batch += [half + half for _ in range(count)]  # a float: 24 bytes
            elif count:  # a bytes object of n bytes asks pymalloc for 33 + n
                batch += [bytes(size - 33) for _ in range(count)]
        _FILLERS.append(batch)


_HELD: list[int] = []  # C heap chunks taken by drain_malloc_free_lists; never freed


def _malloc_free_chunks(libc) -> list[tuple[int, int]]:
    """(chunk size, count) of the main arena's free chunks, from glibc's ``malloc_info``."""
    import ctypes
    import os
    import re

    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]

    def write(fd: int) -> None:
        stream = libc.fdopen(os.dup(fd), b"w")
        if stream:
            try:
                libc.malloc_info(0, stream)
            finally:
                libc.fclose(stream)

    main = _captured(0, write).split('<heap nr="1">', 1)[0]  # the main arena; threads would add others
    # sizes are printed with the chunk's flag bit (PREV_INUSE): masked off
    return [(int(lo) & ~15, int(n)) for lo, n in
            re.findall(r'<(?:size|unsorted) from="(\d+)" to="\d+" total="\d+" count="(\d+)"', main)]


def drain_malloc_free_lists() -> None:
    """Take the C heap's free chunks (glibc's malloc), for good, so a server's mallocs come from fresh
    memory at the top of the heap.

    Otherwise each malloc in a server takes one of the zygote's free chunks, all over its heap, and
    writes to it, to its neighbours on the free list and to the next chunk's header. Measured: 0.15 MiB
    less copied per server, for ~0.2 MiB more in the zygote."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        malloc = libc.malloc
        libc.malloc_info  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    for size in range(32, 1032 + 1, 16):  # the thread cache: up to 7 free chunks of each small size
        _HELD.extend(malloc(size - 8) for _ in range(7))
    for _ in range(3):  # taking part of a larger chunk leaves the rest free: again
        chunks = _malloc_free_chunks(libc)
        if not chunks:
            break
        for size, count in chunks:
            _HELD.extend(malloc(max(size, 32) - 8) for _ in range(count))


# -- immortal objects (CPython 3.12+) -------------------------------------------------------------
# PEP 683: on a 64-bit build an object whose reference count has its low 32 bits all set is immortal;
# Py_INCREF and Py_DECREF leave its count, and so its page, alone.
_IMMORTAL = 0xFFFFFFFF


def immortal_refcounts_work() -> bool:
    """Whether this interpreter leaves an ``_IMMORTAL`` reference count alone: CPython 3.12 or later,
    GIL build (the free-threaded one keeps its counts elsewhere), tried on a throwaway object."""
    import ctypes
    import sysconfig

    if (sys.implementation.name != "cpython" or sys.version_info < (3, 12) or sys.maxsize < 2**32
            or sysconfig.get_config_var("Py_GIL_DISABLED") or hasattr(sys, "gettotalrefcount")):
        return False
    probe = [object()]
    count = ctypes.c_ssize_t.from_address(id(probe))
    before = count.value
    count.value = _IMMORTAL
    more = [probe, probe]
    works = count.value == _IMMORTAL
    del more
    count.value = before  # mortal again, so the probe is freed
    return works


def immortalize_modules() -> int:
    """In the zygote, after its freeze: make what the loaded modules hold (functions, code, classes,
    constants, module state) immortal. Returns how many objects it changed; 0 where it cannot.

    A server touches these objects wherever its code runs, and each reference count it writes copies a
    4 KiB page of the zygote's; immortal, they stay shared. Measured on 3.12: 5.6 → ~3 MiB private per
    server. What the modules hold is there for the process's life anyway; what the zygote drops of it
    later is never freed, a one-off. Frames are left out: they are the zygote's running state. An
    extension built for the stable ABI of an older Python still counts on these objects (the page is
    copied), harmlessly: its count stays billions away from zero."""
    import ctypes
    import gc
    import types

    if not immortal_refcounts_work():
        return 0
    # Visited objects are told apart by their (now immortal) counts, not by a set of their ids: that set
    # and its ~60k ints took ~3 MiB that the zygote kept (and pymalloc holes that fill_pymalloc_pools then
    # filled). Only types that were immortal already (the static ones) are remembered, to visit them once.
    static_types: set[int] = set()
    todo: list[object] = [m for m in list(sys.modules.values()) if m is not None]
    changed = 0
    while todo:
        obj = todo.pop()
        if isinstance(obj, types.FrameType):
            continue
        count = ctypes.c_ssize_t.from_address(id(obj))
        if count.value & _IMMORTAL == _IMMORTAL:  # made so by this pass, or by the interpreter
            if not isinstance(obj, type) or id(obj) in static_types:
                continue
            static_types.add(id(obj))
        else:
            count.value = _IMMORTAL
            changed += 1
        if isinstance(obj, types.CodeType):  # not a gc container: its references, by hand
            # co_varnames & co are built on each access: their items, not the tuples
            todo += (obj.co_consts, obj.co_names, obj.co_filename, obj.co_name, obj.co_qualname,
                     obj.co_linetable, obj.co_exceptiontable, *obj.co_varnames, *obj.co_cellvars,
                     *obj.co_freevars)
        else:
            todo += gc.get_referents(obj)
    return changed
