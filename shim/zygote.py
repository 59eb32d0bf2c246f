"""A warm parent for shim servers: imports the server once, then forks one per ``start``.

Why: a fresh Python process spends ~200 ms and ~15 MiB importing asyncio, protobuf and the service
before it can answer containerd; the Go shim is serving in ~20 ms with ~3 MiB. Forked from a process
that already holds those modules (frozen out of the garbage collector's reach with ``gc.freeze``),
a server is ready at once and shares the pages with every sibling.

One zygote per containerd address and per version of the code on disk (both are in its socket's
name, so an upgrade never serves old code). ``start`` asks it over a root-only unix socket, handing
over the listening socket with SCM_RIGHTS; if no zygote answers, ``start`` forks the server itself as
before and launches a zygote for the next one. The zygote exits when idle for ``PYRUNC_ZYGOTE_IDLE``
seconds (default 600) or when containerd's socket is gone. ``PYRUNC_ZYGOTE=0`` turns it off.

The request is a list of length-prefixed byte strings (``_socket`` and int.to_bytes only: the client
side runs inside ``start``, whose imports are kept tiny).
"""

from __future__ import annotations

import os
import sys

ZYGOTE_DIR = "/run/containerd/s"
_MAGIC = b"pyrunc-zygote/1"
_SHIM_DIR = os.path.dirname(os.path.abspath(__file__))
FORKED = False  # True in a server this zygote forked (for its log line)
_LOCK: int | None = None  # the zygote's lock fd
_CMDLINE_ROOM = 512
_MAX_REQUEST = 16 << 20  # argv, env and options: far below this
_REFILL_DELAY = 0.1  # seconds without a request before the next spare is forked


def enabled() -> bool:
    return os.environ.get("PYRUNC_ZYGOTE", "1") not in ("0", "false", "no", "")


def socket_path(address: str, directory: str = ZYGOTE_DIR) -> str:
    """Keyed by containerd's address, the interpreter and the code's files (names, sizes, mtimes)."""
    from shim.cli import _sha256 as sha256  # not hashlib: its import is heavier than this whole module

    key = [sys.executable, address]
    todo = [_SHIM_DIR]
    while todo:  # scandir, not os.walk: this runs in every start (~0.5 ms less)
        with os.scandir(todo.pop()) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    key.append(f"{entry.path}:{st.st_size}:{st.st_mtime_ns}")
                elif entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
    return os.path.join(directory, "pyrunc-zygote-" + sha256("\0".join(key).encode()).hexdigest()[:32])


def _pack(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "big") + item for item in items)


def _unpack(data: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        items.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
        if pos > len(data):
            raise ValueError("truncated zygote request")
    return items


# -- client side (in `start`) ---------------------------------------------------------------------
def request_server(path: str, argv: list[str], cwd: str, listener_fd: int, options: bytes,
                   extra_env: dict[str, str] | None = None, timeout: float = 2.0) -> int | None:
    """Ask the zygote at ``path`` for a server; its pid, or None when no zygote could do it."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        env = [f"{k}={v}".encode() for k, v in {**os.environ, **(extra_env or {})}.items()]
        payload = _pack([_pack([_MAGIC, os.fsencode(cwd), options, str(len(argv)).encode(),
                                *(os.fsencode(a) for a in argv), *env])])  # one item: its length frames it
        sock.sendmsg([payload[:1]], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                      listener_fd.to_bytes(4, sys.byteorder))])
        sock.sendall(payload[1:])
        reply = b""
        while not reply.endswith(b"\n") and (chunk := sock.recv(64)):
            reply += chunk
        if not reply.strip().isdigit():
            return None
        # The go-ahead: until it arrives the forked server waits, and without it (we gave up, timed
        # out, died) it exits, so a fallback fork here can never leave two servers on one socket.
        sock.sendall(b"G")
        return int(reply)
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def launch(address: str, path: str) -> None:
    """Start a zygote in the background for later starts; detached, silent, never waited for here
    (it becomes init's child when ``start`` exits)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    # The package may run from a checkout (cmd/ launcher) rather than an installed copy.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(_SHIM_DIR),
                                                                     os.environ.get("PYTHONPATH")])))
    try:
        # The padding reserves room in argv's memory: each forked server rewrites it (set_cmdline)
        argv = [sys.executable, "-m", "shim.zygote", address, path, " " * _CMDLINE_ROOM]
        os.posix_spawn(sys.executable, argv, env,
                       file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                                     (os.POSIX_SPAWN_DUP2, devnull, 2)],
                       setsid=True)
    except OSError:
        pass  # an optimisation only
    finally:
        os.close(devnull)


# -- the zygote -----------------------------------------------------------------------------------
def serve_forever(address: str, path: str, idle: float) -> int:
    import fcntl
    import gc
    import socket

    from shim import memory

    memory.before_imports()
    from shim import cli, serve  # noqa: F401 - the point: pay the imports once, before any fork

    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    global _LOCK
    lock = _LOCK = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another zygote for the same key won the race
    for stale in [path, *_warm_up_sockets(path)]:  # left by a zygote or a spare killed mid-way
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(64)
    server.settimeout(5.0)
    import signal

    # SIGTERM ends the loop through the finally below, so the socket and lock files go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    memory.before_freeze(f"{path}.warm-{os.getpid()}")
    gc.collect()
    gc.freeze()  # what was imported stays out of the collector's way: pages stay shared after fork
    memory.after_freeze()
    last = refill_at = _now()
    spare = None
    try:
        while _now() - last < idle and os.path.exists(address):
            # The next spare is forked once no request came for a moment: not while the server just
            # handed a request competes for the CPU with containerd's next calls to it.
            if spare is None and _now() >= refill_at:
                try:
                    spare = _Spare.fork(server)
                except OSError as e:  # no fork now (EAGAIN, ENOMEM): try later; requests fork their own
                    print(f"pyrunc zygote: cannot fork a spare: {e}", file=sys.stderr)
                    refill_at = _now() + 1.0
            server.settimeout(5.0 if spare is not None else max(0.001, refill_at - _now()))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            last = _now()
            with conn:
                try:
                    if _peer_allowed(conn):
                        (spare or _Spare.fork(server, warm=False)).take(conn, server)
                except OSError as e:  # a bad or stalled caller, a failed fork: the zygote stays
                    print(f"pyrunc zygote: request failed: {e}", file=sys.stderr)
                finally:
                    spare, refill_at = None, _now() + _REFILL_DELAY
    finally:
        if spare is not None:
            spare.close()  # it sees EOF and leaves
        server.close()
        for p in (path, path + ".lock"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return 0


def _warm_up_sockets(path: str) -> list[str]:
    """The warm-up sockets (``<path>.warm-<pid>``) of processes that are gone."""
    directory, prefix = os.path.dirname(path), os.path.basename(path) + ".warm-"
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names
            if n.startswith(prefix) and not os.path.exists(f"/proc/{n.removeprefix(prefix)}")]


def _now() -> float:
    import time

    return time.monotonic()


def _peer_allowed(conn) -> bool:
    import socket

    uid = int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[4:8], sys.byteorder)
    return uid in (0, os.geteuid())


class _Spare:
    """A server forked ahead of its request, so that a ``start`` does not wait for a fork (~5 ms) nor for
    the copy-on-write faults a fresh child takes as it first runs (~5 ms more). It waits on a socketpair
    for the caller's connection, then reads the request from the caller itself (see _serve_request).
    Forked through an intermediate that exits at once: the server is nobody's child, as before."""

    def __init__(self, channel, pid: int) -> None:
        self.channel = channel
        self.pid = pid

    @classmethod
    def fork(cls, server, warm: bool = True) -> _Spare:
        """``warm``: the spare warms up first (a spare forked for a request already waiting does not)."""
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            first = os.fork()
            if first == 0:
                try:
                    if os.environ.get("PYRUNC_RECORD_CODE"):  # tools/hot_code.py: what a server runs, from
                        from shim import code_layout  # the fork on (its after-fork hooks, this function)

                        code_layout.record(os.environ["PYRUNC_RECORD_CODE"])
                    spare = os.fork()
                    if spare == 0:
                        ours.close()
                        _spare_main(theirs, server, warm)
                    theirs.sendall(spare.to_bytes(4, sys.byteorder))  # the zygote's way to its priority
                finally:
                    os._exit(0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        os.waitpid(first, 0)
        try:
            pid = int.from_bytes(_recv_exactly(ours, 4), sys.byteorder)
        except BaseException:
            ours.close()
            raise
        return cls(ours, pid)

    def take(self, conn, server) -> None:
        """Hand ``conn`` over, and let go of this spare. One retry with a new spare when this one is gone
        (killed while it waited)."""
        import socket

        try:
            # Its warm-up runs at the lowest priority, which a request waiting for it must not inherit.
            os.setpriority(os.PRIO_PROCESS, self.pid, os.getpriority(os.PRIO_PROCESS, 0))
        except OSError:
            pass  # gone (see below), or not ours to raise: it gives the priority back itself after warm-up
        try:
            socket.send_fds(self.channel, [b"J"], [conn.fileno()])
        except OSError:
            self.close()
            retry = _Spare.fork(server, warm=False)
            try:
                socket.send_fds(retry.channel, [b"J"], [conn.fileno()])
            finally:
                retry.close()
        else:
            self.close()

    def close(self) -> None:
        self.channel.close()


def _recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("spare gone before it said its pid")
        data += chunk
    return data


def _spare_main(channel, server, warm: bool) -> None:
    """In the spare: get ready, wait for a caller's connection, serve it; never returns."""
    import signal
    import socket

    status = 1
    try:
        server_path = server.getsockname()
        server.close()
        if _LOCK is not None:
            os.close(_LOCK)  # the zygote's flock must not outlive the zygote in its servers
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the zygote's handler is not the server's
        os.setsid()  # out of the zygote's session, as a server leaves containerd's
        if warm:
            _warm_up_quietly(f"{server_path}.warm-{os.getpid()}")
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
        channel.close()
        if not fds:
            status = 0  # the zygote is gone: no request will come
            return
        with socket.socket(fileno=fds[0]) as conn:
            _serve_request(conn)
    except BaseException as e:  # a bad request: the caller falls back to forking its own server
        print(f"pyrunc zygote: request failed: {e!r}", file=sys.stderr)
    finally:
        os._exit(status)


def _warm_up_quietly(path: str) -> None:
    """:func:`_warm_up` at the lowest CPU priority, which is given back after: a spare warms up while the
    server forked before it may be serving its first calls, and must not slow those down. Both this and
    :meth:`_Spare.take` give the priority back: a request can be handed over before the spare got as far
    as lowering it (then only this restores it), or in the middle of its warm-up (then take cuts it short)."""
    priority = os.getpriority(os.PRIO_PROCESS, 0) if os.geteuid() == 0 else None  # only root may raise it again
    if priority is not None:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    try:
        _warm_up(path)  # best effort: only slower without it
    finally:
        if priority is not None:
            os.setpriority(os.PRIO_PROCESS, 0, priority)


def _warm_up(path: str) -> None:
    """What every server does first, done once more in the spare before the request arrives: a forked
    child's first run of any code takes copy-on-write faults (~5 ms for this path), paid here while
    nobody waits. ``path``: a free name in the zygote's root-only directory."""
    from shim import cli, memory

    cli.parse_args(["-namespace", "warm", "-address", "/", "-id", "warm", "-bundle", "/", "start"])
    memory.warm_up(path)


def _serve_request(conn) -> None:
    import socket

    conn.settimeout(5.0)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 1)
    for fd in fds:
        # recv_fds gives inheritable fds: without this every runc/logger the server spawns would hold
        # (and keep accepting on) the shim's API socket.
        os.set_inheritable(fd, False)
    try:
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            if len(data) > _MAX_REQUEST:
                raise ValueError("zygote request too large")
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        if len(fds) != 1:
            raise ValueError(f"zygote request with {len(fds)} fds")
        items = _unpack(_unpack(data)[0])
        if items[0] != _MAGIC:
            raise ValueError("not a zygote request")
        cwd, options, argc = os.fsdecode(items[1]), items[2], int(items[3])
        argv = [os.fsdecode(a) for a in items[4:4 + argc]]
        env = dict(os.fsdecode(e).split("=", 1) for e in items[4 + argc:])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.sendall(b"%d\n" % os.getpid())
    _become(conn, fds[0], cwd, options, argv, env)


def _become(conn, listener_fd: int, cwd: str, options: bytes, argv: list[str], env: dict[str, str]) -> None:
    """In the server: take the caller's environment and cwd, then serve; never returns. Everything up to
    accepting connections happens while ``start`` finishes; accepting waits for its go-ahead."""
    import socket

    from shim import cli

    status = 1
    try:
        os.chdir(cwd)
        from shim import memory

        memory.set_environ(env)
        args = cli.parse_args(argv)
        set_cmdline(["containerd-shim-pyrunc-v2", *argv])  # what ps shows: a shim, not the zygote
        listener = socket.socket(fileno=listener_fd)
        args.socket_path = listener.getsockname()
        import shim.zygote  # this file runs as __main__ here; serve looks at the package module

        shim.zygote.FORKED = True  # (imported before the fork: memory.before_freeze)

        def go_ahead() -> bool:
            # Without it (start gave up on us, see request_server) serving would be a second server.
            try:
                conn.settimeout(30.0)
                return conn.recv(1) == b"G"
            except OSError:
                return False
            finally:
                conn.close()

        cli._become_server(args, listener, options, go_ahead)  # never returns
    finally:
        os._exit(status)


def set_cmdline(argv: list[str]) -> bool:
    """Rewrite /proc/self/cmdline in place (the kernel shows the memory between arg_start and arg_end),
    truncated to the room the original argv had. No setproctitle dependency for one write."""
    import ctypes

    fields = open("/proc/self/stat", "rb").read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5) fields 48 and 49)
    room = end - start
    data = b"\0".join(os.fsencode(a) for a in argv)[:room - 1]
    try:
        ctypes.memmove(start, data + b"\0" * (room - len(data)), room)
    except (OSError, ValueError):
        return False
    return True


if __name__ == "__main__":
    _address, _path = sys.argv[1], sys.argv[2]  # argv[3] is padding for set_cmdline
    sys.exit(serve_forever(_address, _path, float(os.environ.get("PYRUNC_ZYGOTE_IDLE", "600"))))
