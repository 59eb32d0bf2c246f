"""The containerd-shim-pyrunc-v2 binary: flags, ``start``, ``delete``, ``-v`` and ``-info``.

containerd runs ``start`` to learn a shim's address and ``delete`` to clean up after one, and waits for
both: they are on its hot path. So this module loads almost nothing up front — no asyncio, protobuf,
subprocess, json, hashlib or dataclasses: each costs milliseconds against a Python start-up of ~15 ms.
What an action needs it imports itself. The long-running server (``shim.serve``) is entered only
through ``start``'s fork. ``-info`` (not on the hot path) lives in ``shim.info``.

What ``start`` prints depends on what the calling containerd can read back. containerd does not say
which release it is before 2.3; what it does say, release by release (pkg/shim/util.go ``Command``,
core/runtime/v2/shim.go ``parseStartResponse``):

=============  ================  =======================  ==================================================
containerd     MAX_SHIM_VERSION  stdin                    ``start`` prints
=============  ================  =======================  ==================================================
1.6            unset             options Any, or nothing  ``unix:///run/containerd/s/<sha256>`` (plain)
1.7, 2.0–2.2   ``2``             options Any, or nothing  ``{"version":2,"address":"unix://…","protocol":"ttrpc"}``
2.3 and later  ``2``             BootstrapParams          BootstrapResult{version 3, address, "ttrpc"}, marshalled
any caller     ``3`` or more     options Any, or nothing  ``{"version":3,…,"protocol":"ttrpc"}``
=============  ================  =======================  ==================================================

- 1.6 uses all of stdout, trimmed, as the address: anything but the plain address breaks it.
- 1.7 introduced MAX_SHIM_VERSION, GRPC_ADDRESS and NAMESPACE together, and accepts JSON up to version 2
  ("unsupported shim version" above). 2.0–2.2 set exactly the same environment (MAX_SHIM_VERSION is still
  ``2``) and the same stdin, so they cannot be told from 1.7: they get version 2 as well and speak
  containerd.task.v2 to us, which the server serves next to v3. (Their Go shim answers version 3
  unconditionally; it never has to run under 1.7.) GRPC_ADDRESS and NAMESPACE add nothing to tell apart.
- 2.3 is the first to identify itself, by the BootstrapParams on stdin (runtime options in its
  ``extensions``). It parses a marshalled BootstrapResult before the JSON and plain forms — what its own
  Go shim prints — so that is the answer, with version 3: task v3.
- A MAX_SHIM_VERSION above 2 (no containerd sets one yet) is taken at its word, capped at 3.

stdin is told apart as upstream's pkg/shim/compat.go does: a legacy options Any often parses as a
BootstrapParams too (its type_url and value land in instance_id and namespace), so it counts as one only
when instance_id and namespace equal ``-id`` and ``-namespace``. Either way the server gets the options
Any itself (shim.options.from_bytes parses it). Both forms are decoded by hand: loading protobuf would
cost several times the rest of ``start``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable, Mapping, Sequence
    from typing import NoReturn

PROG = "containerd-shim-pyrunc-v2"
FALLBACK_VERSION = "0.1.0"  # pyproject's version, for when the package is not installed
SOCKET_DIR = "/run/containerd/s"  # containerd's state dir + /s; tests point it elsewhere
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")  # in this order
DEFAULT_RUNC_ROOT = "/run/containerd/runc"
KILLED_STATUS = 128 + 9  # what delete reports when the real exit is unknown: killed by SIGKILL
MAX_OOM_SCORE_ADJ = 1000
MAX_SHIM_VERSION_ENV = "MAX_SHIM_VERSION"  # set by containerd 1.7 and later (to 2, so far)
NEWEST_BOOTSTRAP_VERSION = 3  # version 3 means containerd.task.v3, which the server serves next to v2
PROTOCOL = "ttrpc"
OPTIONS_TYPES = ("containerd.runc.v1.Options", "runtimeoptions.v1.Options")  # what shim.options reads
LOG_LEVEL_DEBUG = -4  # bootstrap.v1.LogLevel: DEBUG, and TRACE (-8) below it, mean -debug


class ShimError(Exception):
    """A failure with a message clear enough to show containerd's user as is."""


class UsageError(Exception):
    """A bad command line: reported with the usage text, exit status 2, as Go's flag package does."""


class HelpRequested(UsageError):
    """-h / -help: usage text, exit status 0."""


class ShimArgs:
    """The command line, plus the addresses containerd passes in the environment.

    A plain class, not a dataclass: importing dataclasses (and inspect behind it) would more than
    double the import time of ``start`` and ``delete``.
    """

    __slots__ = ("namespace", "address", "publish_binary", "id", "bundle", "debug", "socket_path", "action",
                 "version", "info", "ttrpc_address", "grpc_address")

    def __init__(self, namespace: str = "", address: str = "", publish_binary: str = "containerd", id: str = "",
                 bundle: str = "", debug: bool = False, socket_path: str = "", action: str | None = None,
                 version: bool = False, info: bool = False, ttrpc_address: str | None = None,
                 grpc_address: str | None = None) -> None:
        self.namespace = namespace
        self.address = address  # containerd's gRPC socket
        self.publish_binary = publish_binary
        self.id = id
        self.bundle = bundle or os.getcwd()  # containerd runs the shim in the bundle
        self.debug = debug
        self.socket_path = socket_path  # the server's listening socket, set by start
        self.action = action
        self.version = version
        self.info = info
        self.ttrpc_address = os.environ.get("TTRPC_ADDRESS", "") if ttrpc_address is None else ttrpc_address
        self.grpc_address = os.environ.get("GRPC_ADDRESS", "") if grpc_address is None else grpc_address

    def __repr__(self) -> str:
        return f"ShimArgs({', '.join(f'{name}={getattr(self, name)!r}' for name in self.__slots__)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShimArgs):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass with eq


# -- command line ---------------------------------------------------------------------------------

_BOOL_FLAGS = {"debug": "debug", "v": "version", "version": "version", "info": "info"}
_STRING_FLAGS = {"namespace": "namespace", "address": "address", "publish-binary": "publish_binary", "id": "id",
                 "bundle": "bundle", "socket": "socket_path"}
_GO_BOOLS = {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
             "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False}

USAGE = f"""Usage of {PROG}:
  -address string        grpc address back to main containerd
  -bundle string         path to the bundle if not workdir
  -debug                 enable debug output in logs
  -id string             id of the task
  -info                  get the option protobuf from stdin, print the shim info protobuf to stdout, and exit
  -namespace string      namespace that owns the shim
  -publish-binary string path to publish binary (used for publishing events) (default "containerd")
  -socket string         socket path to serve
  -v, -version           show the shim version and exit
action: start | delete
"""


def parse_args(argv: Sequence[str]) -> ShimArgs:
    """Flags the way Go's flag package reads them: ``-f`` or ``--f``, ``-f value`` or ``-f=value``;
    booleans take no value (but accept ``-debug=false``); the first word that is not a flag is the
    action, and what follows it is ignored (newer containerd may append more)."""
    values: dict[str, object] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        i += 1
        if arg == "--":
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        name, has_value, value = name.partition("=")
        if name in ("h", "help"):
            raise HelpRequested()
        if name in _BOOL_FLAGS:
            if has_value and value not in _GO_BOOLS:
                raise UsageError(f'invalid boolean value "{value}" for -{name}: parse error')
            values[_BOOL_FLAGS[name]] = _GO_BOOLS[value] if has_value else True
        elif name in _STRING_FLAGS:
            if not has_value:
                if i == len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
                i += 1
            values[_STRING_FLAGS[name]] = value
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
    return ShimArgs(action=argv[i] if i < len(argv) else None, **values)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """The console-script entry point; returns the exit status."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except HelpRequested:
        sys.stderr.write(USAGE)
        return 0
    except UsageError as e:
        sys.stderr.write(f"{e}\n{USAGE}")
        return 2
    if args.version:
        # The Go shim's layout (fmt.Println: "Version: " and its value are two operands, hence two spaces),
        # ending in an empty line as Go's does; Python's version stands where Go's is.
        sys.stdout.write(f"{PROG}:\n  Version:  {_version()}\n  Revision: {_revision()}\n"
                         f"  Python version: {_python_version()}\n\n")
        return 0
    if args.info:
        return _info()
    if args.action is None:
        return _fail("missing action (start or delete)")
    action = {"start": start, "delete": delete}.get(args.action)
    if action is None:
        return _fail(f"unknown action {args.action!r} (want start or delete)")
    if not args.namespace:
        return _fail("shim namespace cannot be empty")
    if not args.id:
        return _fail("shim id cannot be empty")
    try:
        status = action(args)
    except (OSError, ValueError, ShimError) as e:
        status = _fail(f"{args.action}: {e}")
    if argv is None:  # the real process, not a caller in Python: skip the interpreter's teardown (~8 ms)
        _exit_now(status)
    return status


def _exit_now(status: int) -> NoReturn:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        status = status or 1
    os._exit(status)


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return 1


def _version() -> str:
    import shim

    version = getattr(shim, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as package_version

        return package_version("pyrunc")
    except Exception:  # not installed (run from a checkout)
        return FALLBACK_VERSION


def _revision() -> str:
    """The git commit of the checkout this code runs from — what a Go build stamps as its Revision.
    Empty for an installed copy (as for a Go build without one). Read from .git directly: running git
    would need subprocess and a git binary."""
    import shim

    top = os.path.dirname(os.path.dirname(os.path.abspath(shim.__file__)))
    git = os.path.join(top, ".git")
    try:
        if os.path.isfile(git):  # a worktree or submodule: "gitdir: <path>"
            with open(git) as f:
                git = os.path.join(top, f.read().strip().removeprefix("gitdir: "))
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head  # detached
        ref = head.removeprefix("ref: ")
        common = git  # a worktree keeps its branches in the main repository
        if os.path.isfile(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as f:
                common = os.path.join(git, f.read().strip())
        for where in (git, common):
            try:
                with open(os.path.join(where, ref)) as f:
                    return f.read().strip()
            except FileNotFoundError:
                pass
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                commit, _, name = line.strip().partition(" ")
                if name == ref:
                    return commit
    except OSError:
        pass
    return ""


def _python_version() -> str:
    return ".".join(str(n) for n in sys.version_info[:3])


def _info() -> int:
    """``-info``: a marshalled containerd.types.RuntimeInfo on stdout (see shim.info)."""
    from shim.info import InfoError, runtime_info

    try:
        data = runtime_info(_read_stdin(), _version(), _revision()).SerializeToString()
    except InfoError as e:
        return _fail(str(e))
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


# -- start ----------------------------------------------------------------------------------------

def start(args: ShimArgs) -> int:
    """Make sure a server listens for this container's group, and print its address in the form the
    calling containerd reads (see the table at the top).

    One server serves a whole group (a Kubernetes pod): if the group's socket is alive, its address
    is the answer. Otherwise bind a new socket and fork the server with it.
    """
    data = _read_stdin()
    params = bootstrap_params(data, args.id, args.namespace)
    options, socket_dir = data, None  # the legacy forms: the options Any itself, or nothing
    if params is not None:
        options, socket_dir = params.options, params.socket_dir or None
        if socket_dir is not None and not socket_dir.startswith("/"):
            raise ShimError(f"socket_dir {socket_dir!r} is not an absolute path")
        params.apply(args)
    form, version = answer_form(params is not None, os.environ.get(MAX_SHIM_VERSION_ENV))
    address = socket_address(args.address, args.namespace, group_id(args.bundle, args.id), socket_dir)
    path = address.removeprefix("unix://")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ShimError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes: "
                        "use a shorter socket_dir (containerd 2.3) or containerd state dir")
    answer = encode_answer(form, version, address)
    listener = _listen(path)
    if listener is None:
        write_address(args.bundle, address)
        _print(answer)
        return 0
    args.socket_path = path
    try:
        # Before the fork, as the Go shim does: the server may read it, and a failure needs no kill.
        write_address(args.bundle, address)
        pid = _server_from_zygote(args, listener, options)
        if pid is None:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
    except BaseException:
        listener.close()
        _remove(path)
        raise
    if pid == 0:
        _become_server(args, listener, options)
    listener.close()
    _adjust_oom_score(pid)
    try:
        _print(answer)
    except BaseException:
        # containerd will never learn the address, so nobody would ever stop this server.
        import signal

        os.kill(pid, signal.SIGKILL)
        _remove(path)
        raise
    return 0


def answer_form(bootstrap: bool, max_shim_version: str | None) -> tuple[str, int]:
    """How ``start`` answers: ("plain", 0), ("json", 2 or 3) or ("protobuf", 3) — the table at the top.
    ``bootstrap``: stdin held a BootstrapParams; ``max_shim_version``: $MAX_SHIM_VERSION, if set."""
    if bootstrap:
        return "protobuf", NEWEST_BOOTSTRAP_VERSION
    try:
        most = int(max_shim_version or "0")
    except ValueError:
        most = 0  # garbage is no promise: the plain address is the one answer every containerd reads
    if most < 2:
        return "plain", 0
    return "json", min(most, NEWEST_BOOTSTRAP_VERSION)


def encode_answer(form: str, version: int, address: str) -> bytes:
    if form == "plain":
        return address.encode()
    if form == "json":
        return encode_bootstrap_json(version, address, PROTOCOL)
    return encode_bootstrap_result(version, address, PROTOCOL)


def _read_stdin() -> bytes:
    """All of stdin: the runtime options Any, a BootstrapParams (containerd 2.3+), or nothing."""
    stdin = sys.stdin
    if stdin is None or stdin.isatty():  # no stdin, or a person at a terminal
        return b""
    return stdin.buffer.read()


class BootstrapParams:
    """What ``start`` uses of a ``containerd.runtime.bootstrap.v1.BootstrapParams``, decoded by hand.

    ``options`` is the marshalled Any of the first extension that holds runtime options (a type
    shim.options reads), else empty; other extensions (room for CRI or NRI configuration) are ignored.
    """

    __slots__ = ("instance_id", "namespace", "log_level", "containerd_version", "ttrpc_address",
                 "grpc_address", "binary", "options", "socket_dir")

    def __init__(self) -> None:
        self.instance_id = self.namespace = self.containerd_version = ""
        self.ttrpc_address = self.grpc_address = self.binary = ""
        self.log_level = 0
        self.options = b""
        self.socket_dir: str | None = None  # proto3 optional: unset differs from ""

    def apply(self, args: ShimArgs) -> None:
        """What containerd says here wins over the environment: it is meant to replace it (pkg/shim's
        TODOs), and today both carry the same values. The socket's name keeps hashing ``-address``, the
        key of every earlier start for the same group, as long as containerd passes it."""
        args.ttrpc_address = self.ttrpc_address or args.ttrpc_address
        args.grpc_address = self.grpc_address or args.grpc_address
        args.address = args.address or self.grpc_address
        args.publish_binary = self.binary or args.publish_binary
        args.debug = args.debug or self.log_level <= LOG_LEVEL_DEBUG


def bootstrap_params(data: bytes, id: str, namespace: str) -> BootstrapParams | None:
    """``data`` as a BootstrapParams meant for this shim; None for the legacy forms (an options Any,
    nothing, or bytes that are not a well-formed BootstrapParams — the server reports bad options)."""
    if not data:
        return None
    try:
        params = decode_bootstrap_params(data)
    except ValueError:
        return None
    # A legacy Any parses too, as instance_id = type_url and namespace = value (compat.go's check).
    if params.instance_id != id or params.namespace != namespace:
        return None
    return params


def group_id(bundle: str, container_id: str) -> str:
    """Which group, hence which server, the container belongs to: the first of GROUP_LABELS among the
    annotations of the bundle's config.json, else the container itself."""
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        data = f.read()
    # Go's encoding/json writes these keys verbatim: when neither occurs there is nothing to parse.
    if not any(label.encode() in data for label in GROUP_LABELS):
        return container_id
    spec = parse_json(data)
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    for label in GROUP_LABELS:
        if isinstance(annotations, dict) and label in annotations:
            group = annotations[label]
            if not isinstance(group, str):
                raise ShimError(f"config.json: annotation {label} is not a string")
            return group
    return container_id


def socket_address(address: str, namespace: str, group: str, socket_dir: str | None = None) -> str:
    """The group's socket, named exactly as containerd's shim.SocketAddress names it:
    ``unix://<socket dir>/`` + hex sha256 of Go's ``filepath.Join(address, namespace, group)``."""
    digest = _sha256(go_path_join(address, namespace, group).encode()).hexdigest()
    return f"unix://{socket_dir or SOCKET_DIR}/{digest}"


def go_path_join(*parts: str) -> str:
    """Go's filepath.Join: the non-empty parts joined with '/', then lexically cleaned."""
    joined = "/".join(part for part in parts if part)
    if not joined:
        return ""
    cleaned = os.path.normpath(joined)
    # POSIX lets normpath keep exactly two leading slashes; Go's Clean keeps one.
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def _sha256(data: bytes):  # the hash object's type is private to each module
    # hashlib loads OpenSSL (~3 ms); the interpreter's own SHA-256 is plenty for one digest.
    try:
        from _sha256 import sha256  # Python 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # Python 3.12+
        except ImportError:
            from hashlib import sha256
    return sha256(data)


def _listen(path: str) -> _socket.socket | None:
    """A new listening socket at ``path``; None when a live server already listens there."""
    import errno

    # Only root may enter: the socket is the shim's whole API (never an abstract socket, CVE-2020-15257).
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError as e:
        raise ShimError(f"cannot create the shim socket {path}: {e.strerror}: containerd and its shims run as "
                        "root (the socket directory is root-only)") from e
    try:
        # Between another start's bind and its listen its socket refuses connections, like a dead one: the
        # directory's lock keeps this start from taking it for dead and replacing it.
        _flock(lock)
        try:
            return _bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
        if _is_served(path):
            return None
        os.unlink(path)  # left by a server that died without cleaning up
        return _bind(path)
    finally:
        os.close(lock)  # (releases the lock)


def _flock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)


def _bind(path: str) -> _socket.socket:
    # _socket, not socket: the socket module imports selectors and enum (~9 ms). The server wraps the
    # fd in a socket.socket, after the fork.
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(path, 0o600)
        sock.listen(_socket.SOMAXCONN)
    except BaseException:
        sock.close()
        _remove(path)
        raise
    return sock


def _is_served(path: str) -> bool:
    """Whether something accepts connections at ``path`` (Go's CanConnect, 100 ms)."""
    import _socket

    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(0.1)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (BlockingIOError, TimeoutError):
        return True  # a full backlog: alive, only busy
    finally:
        probe.close()
    return True


def write_address(bundle: str, address: str) -> None:
    """``bundle/address``, replaced atomically: containerd 1.6/1.7 reconnect with it after a restart."""
    path = os.path.join(bundle, "address")
    tmp = os.path.join(bundle, ".address")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, address.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _print(answer: bytes) -> None:
    # No newline, like the Go shim: containerd 1.6 takes all of stdout (trimmed) as the address, and a
    # marshalled BootstrapResult must stay exactly as it is.
    sys.stdout.buffer.write(answer)
    sys.stdout.flush()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _adjust_oom_score(pid: int) -> None:
    """containerd's oom_score_adj + 1 for the server: under memory pressure the kernel should pick the
    shim before containerd. Best effort, as an unprivileged or nested containerd may not allow it."""
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj", "rb") as f:
            score = min(int(f.read()) + 1, MAX_OOM_SCORE_ADJ)
        with open(f"/proc/{pid}/oom_score_adj", "wb") as f:
            f.write(str(score).encode())
    except (OSError, ValueError):
        pass


def _server_from_zygote(args: ShimArgs, listener: _socket.socket, options: bytes) -> int | None:
    """A server forked by the warm zygote (see shim/zygote.py); None means fork one here. When no
    zygote answered, one is launched for the starts that follow."""
    from shim import zygote

    if not zygote.enabled() or not os.path.exists(args.address):
        return None
    path = zygote.socket_path(args.address, SOCKET_DIR)
    env = {"TTRPC_ADDRESS": args.ttrpc_address, "GRPC_ADDRESS": args.grpc_address}
    pid = zygote.request_server(path, server_argv(args), args.bundle, listener.fileno(), options, env)
    if pid is None:
        zygote.launch(args.address, path)
    return pid


def server_argv(args: ShimArgs) -> list[str]:
    """The flags that rebuild ``args`` in another process (with TTRPC_ADDRESS/GRPC_ADDRESS in its env)."""
    argv = ["-namespace", args.namespace, "-address", args.address, "-publish-binary", args.publish_binary,
            "-id", args.id, "-bundle", args.bundle]
    return [*argv, "-debug"] if args.debug else argv


def _become_server(args: ShimArgs, listener: _socket.socket, options: bytes,
                   go_ahead: Callable[[], bool] | None = None) -> NoReturn:
    """The forked child. Whatever happens it ends here, never back in the parent's code."""
    status: object = 1
    try:
        if os.getsid(0) != os.getpid():  # a zygote's spare already is a session leader
            os.setsid()  # out of containerd's session and process group: its signals are not ours
        _stdio_to_devnull()
        import socket

        from shim.serve import serve

        server_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=listener.detach())
        status = serve(args, server_socket, options, go_ahead)
    except SystemExit as e:
        status = 0 if e.code is None else e.code
    except BaseException:
        _log_crash(args)
    finally:
        os._exit(status if isinstance(status, int) and 0 <= status <= 255 else 1)


def _stdio_to_devnull() -> None:
    # containerd 1.6 reads start's stdout and stderr until EOF: the server must not hold them.
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def _log_crash(args: ShimArgs) -> None:
    """Into containerd's log, since stderr is /dev/null by now."""
    try:
        import logging

        from shim import log

        log.setup(args.bundle, args.debug)
        logging.getLogger("pyrunc").exception("shim server failed")
    except BaseException:
        pass


# -- delete ---------------------------------------------------------------------------------------

def delete(args: ShimArgs) -> int:
    """Clean up after a shim that is gone and tell containerd how its container ended.

    Best effort throughout, as the Go shim: what cannot be cleaned is logged on stderr, which
    containerd logs as "cleanup warnings"; stdout carries only the DeleteResponse.
    """
    import time

    options = _saved_options(args)
    if _runc_state_exists(args, options):
        _runc_delete(args, runc_delete_argv(args, options))
    else:  # what runc delete --force would find; not running it saves its ~20 ms in containerd's cleanup
        _log(args, "debug", "runc container already gone")
    rootfs = os.path.join(args.bundle, "rootfs")
    try:
        if _maybe_mounted(rootfs):
            from shim.mount import unmount_all

            unmount_all(rootfs)
    except OSError as e:
        _log(args, "warning", "failed to cleanup rootfs mount", error=e)
    _remove_dead_socket(args)
    pid = _read_int(args, "init.pid", 0)
    status = _read_int(args, "init.exit", KILLED_STATUS)  # written by the server when init exited
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    sys.stdout.buffer.write(encode_delete_response(pid, status, seconds, nanos))
    sys.stdout.flush()
    return 0


def _remove_dead_socket(args: ShimArgs) -> None:
    """A killed server leaves its socket file; nobody else would remove it. A live one (a group's
    shim still serving its other containers) is left alone."""
    try:
        with open(os.path.join(args.bundle, "address")) as f:
            path = f.read().strip().removeprefix("unix://")
    except OSError:
        return
    if path.startswith("/") and os.path.exists(path) and not _is_served(path):
        _remove(path)


def _saved_options(args: ShimArgs) -> dict[str, object]:
    """The runtime options the server saved at Create (``options.json``); defaults when there are none."""
    try:
        with open(os.path.join(args.bundle, "options.json"), "rb") as f:
            options = parse_json(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _log(args, "warning", "failed to read options.json, using defaults", error=e)
        return {}
    return options if isinstance(options, dict) else {}


def _runc_root(args: ShimArgs, options: Mapping[str, object]) -> str:
    return os.path.join(str(options.get("root") or DEFAULT_RUNC_ROOT), args.namespace)


def _runc_state_exists(args: ShimArgs, options: Mapping[str, object]) -> bool:
    """Whether runc may still know the container: its state lives in ``<root>/<id>`` (crun's too). When that
    is gone — the usual case, as the server ran ``runc delete`` at Delete — ``runc delete --force`` has
    nothing to do (it removes that directory and succeeds). True when in doubt."""
    try:
        os.lstat(os.path.join(_runc_root(args, options), args.id))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def runc_delete_argv(args: ShimArgs, options: Mapping[str, object]) -> list[str]:
    """``runc delete --force ID`` with the global flags the server ran runc with."""
    root = _runc_root(args, options)
    argv = [str(options.get("binary_name") or "runc"), "--root", root,
            "--log", os.path.join(args.bundle, "log.json"), "--log-format", "json"]
    if options.get("systemd_cgroup"):
        argv.append("--systemd-cgroup")
    return argv + ["delete", "--force", args.id]


def _runc_delete(args: ShimArgs, argv: list[str]) -> None:
    try:
        status, output = run(argv)
    except OSError as e:
        _log(args, "warning", "failed to remove runc container", error=e)
        return
    if status == 0:
        return
    text = output.decode(errors="replace").strip() or f"exit status {status}"
    if "does not exist" in text or "not found" in text:
        _log(args, "debug", "runc container already gone", error=text)  # the normal case
    else:
        _log(args, "warning", "failed to remove runc container", error=text)


def run(argv: list[str]) -> tuple[int, bytes]:
    """Run ``argv`` with stdin from /dev/null; its exit status and its stdout and stderr together.

    posix_spawn, not subprocess: importing subprocess takes longer than runc delete does. Waited for
    right here: this short-lived process has no reaper (that lives in the server).
    """
    import _signal  # signal imports enum; the C module has the numbers

    r, w = os.pipe()
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_DUP2, w, 2),
        ], setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))  # Python ignores these; a child must not inherit that
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), b"".join(chunks)


def _maybe_mounted(path: str) -> bool:
    """False when nothing is mounted on ``path`` — the usual case, as the server unmounts the rootfs at
    Delete — found without loading ctypes (~6 ms). True when in doubt."""
    if not os.path.lexists(path):
        return False
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            table = f.read()
    except OSError:
        return True
    # mountinfo octal-escapes these in its paths.
    target = os.fsencode(os.path.realpath(path))
    for ch in b"\\ \t\n":
        target = target.replace(bytes([ch]), f"\\{ch:03o}".encode())
    return b" " + target + b" " in table


def _read_int(args: ShimArgs, name: str, default: int) -> int:
    try:
        with open(os.path.join(args.bundle, name), "rb") as f:
            return int(f.read())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        _log(args, "warning", f"failed to read {name}", error=e)
        return default


def _log(args: ShimArgs, level: str, msg: str, **fields: object) -> None:
    """A logrus line on stderr. shim.log (and logging) is imported only when there is something to say."""
    if level == "debug" and not args.debug:
        return
    import time

    from shim.log import format_entry

    sys.stderr.write(format_entry(time.time_ns(), level, msg, fields) + "\n")
    sys.stderr.flush()


# -- wire formats, by hand ------------------------------------------------------------------------

def encode_delete_response(pid: int, exit_status: int, seconds: int, nanos: int) -> bytes:
    """A marshalled ``containerd.task.v2.DeleteResponse`` {pid=1 uint32, exit_status=2 uint32,
    exited_at=3 Timestamp{seconds=1 int64, nanos=2 int32}}, written by hand: loading protobuf would cost
    more than all the rest of delete. Zero scalars are omitted (proto3); exited_at is always there."""
    stamp = _varint_field(1, seconds) + _varint_field(2, nanos)
    return (_varint_field(1, pid & 0xFFFFFFFF) + _varint_field(2, exit_status & 0xFFFFFFFF)
            + bytes([3 << 3 | 2]) + _varint(len(stamp)) + stamp)


def encode_bootstrap_result(version: int, address: str, protocol: str) -> bytes:
    """A marshalled ``containerd.runtime.bootstrap.v1.BootstrapResult`` {version=1 int32, address=2
    string, protocol=3 string}: containerd 2.3+ parses stdout as one before anything else."""
    return _varint_field(1, version) + _bytes_field(2, address.encode()) + _bytes_field(3, protocol.encode())


def encode_bootstrap_json(version: int, address: str, protocol: str) -> bytes:
    """The JSON containerd 1.7+ reads (pkg/shim's BootstrapParams struct: these keys, this order)."""
    return f'{{"version":{version},"address":{_json_string(address)},"protocol":{_json_string(protocol)}}}'.encode()


def _json_string(text: str) -> str:
    # json.dumps without importing json (see parse_json); non-ASCII stays UTF-8, as Go writes it.
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def decode_bootstrap_params(data: bytes) -> BootstrapParams:
    """A marshalled ``containerd.runtime.bootstrap.v1.BootstrapParams``, read as protobuf reads it:
    unknown fields (and known ones with another wire type) skipped, the last of repeated singular fields
    winning, strings checked to be UTF-8. ValueError when ``data`` is not a well-formed message."""
    params = BootstrapParams()
    pos = 0
    while pos < len(data):
        number, wire, value, pos = _read_field(data, pos)
        if wire == 4:
            raise ValueError("end of a group that never began")
        if wire == 2 and number in _BOOTSTRAP_STRINGS:
            setattr(params, _BOOTSTRAP_STRINGS[number], _utf8(value))
        elif number == 3 and wire == 0:
            params.log_level = _int32(value)
        elif number == 8 and wire == 2:
            options = _extension_value(value)
            if not params.options and _any_type(options) in OPTIONS_TYPES:
                params.options = options
    return params


# BootstrapParams' string fields by number (api/runtime/bootstrap/v1/bootstrap.proto, containerd 2.3).
_BOOTSTRAP_STRINGS = {1: "instance_id", 2: "namespace", 4: "containerd_version", 5: "ttrpc_address",
                      6: "grpc_address", 7: "binary", 9: "socket_dir"}


def _extension_value(data: bytes) -> bytes:
    """The marshalled Any in an ``Extension`` {value=1 Any}. Several occurrences of a message field merge,
    which for their encodings is concatenation."""
    parts = []
    pos = 0
    while pos < len(data):
        number, wire, value, pos = _read_field(data, pos)
        if wire == 4:
            raise ValueError("end of a group that never began")
        if number == 1 and wire == 2:
            _any_type(value)  # a malformed Any makes the whole message malformed, as in protobuf
            parts.append(value)
    return b"".join(parts)


def _any_type(data: bytes) -> str:
    """The type of a marshalled ``google.protobuf.Any`` {type_url=1, value=2}: its type_url's last
    segment, as protobuf's Any.Is compares it."""
    url = ""
    pos = 0
    while pos < len(data):
        number, wire, value, pos = _read_field(data, pos)
        if wire == 4:
            raise ValueError("end of a group that never began")
        if number == 1 and wire == 2:
            url = _utf8(value)
    return url.rpartition("/")[2]


def _read_field(data: bytes, pos: int, depth: int = 0) -> tuple[int, int, object, int]:
    """One field at ``pos``: (number, wire type, value, next position). The value is an int for varint and
    fixed-size fields, the bytes of a length-delimited one, None for a group (skipped whole, as unknown
    groups are) and for an end-group tag (wire type 4, for the caller that reads the group)."""
    key, pos = _read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if not 0 < number < 1 << 29:
        raise ValueError(f"invalid field number {number}")
    value: object = None
    if wire == 0:
        value, pos = _read_varint(data, pos)
    elif wire in (1, 5):
        size = 8 if wire == 1 else 4
        value = int.from_bytes(data[pos:pos + size], "little")
        pos += size
    elif wire == 2:
        size, pos = _read_varint(data, pos)
        value = data[pos:pos + size]
        pos += size
    elif wire == 3:
        if depth >= 100:  # protobuf's own recursion limit
            raise ValueError("groups nested too deep")
        while True:
            inner, inner_wire, _, pos = _read_field(data, pos, depth + 1)
            if inner_wire == 4:
                if inner != number:
                    raise ValueError(f"group {number} ended as {inner}")
                break
    elif wire != 4:
        raise ValueError(f"invalid wire type {wire}")
    if pos > len(data):
        raise ValueError("truncated message")
    return number, wire, value, pos


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 70:  # at most 10 bytes
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF  # an int32 is sent sign-extended to 64 bits; protobuf keeps the low 32
    return value - (1 << 32) if value >= 1 << 31 else value


def _utf8(value: object) -> str:
    assert isinstance(value, bytes)
    return value.decode("utf-8")  # UnicodeDecodeError is a ValueError: proto3 strings must be UTF-8


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value if value else b""  # wire type 2


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""  # wire type 0: varint


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int32/int64 goes out as its 64-bit two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _JsonOptions:
    """What json's C scanner reads off a JSONDecoder: json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


def parse_json(data: bytes) -> object:
    """json.loads for our small files, without importing json: json.decoder compiles regular
    expressions when imported (~10 ms, as much as all the rest of start); the C scanner behind it
    needs none of that."""
    text = data.decode("utf-8")
    try:
        from _json import make_scanner
    except ImportError:  # not CPython
        import json

        return json.loads(text)
    text = text.strip(" \t\n\r")
    try:
        value, end = make_scanner(_JsonOptions)(text, 0)
    except StopIteration as e:
        raise ValueError(f"invalid JSON at offset {e.value}") from None
    if end != len(text):
        raise ValueError(f"invalid JSON: extra data at offset {end}")
    return value
