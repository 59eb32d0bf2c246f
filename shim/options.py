"""Runtime options: how containerd tells the shim which runc to run and how.

They arrive as a google.protobuf.Any on ``start``'s stdin and in CreateTaskRequest.options, either as
``containerd.runc.v1.Options`` or — what containerd sends to any runtime not named io.containerd.runc.v2
— ``runtimeoptions.v1.Options`` whose ``config_path`` names a TOML file with the same field names.
The effective options are saved as ``options.json`` in the bundle for the ``delete`` action.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from google.protobuf import any_pb2

from shim.api.containerd.runc.v1 import options_pb2
from shim.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from shim.ttrpc import Code, TTRPCError

RUNC_OPTIONS = "containerd.runc.v1.Options"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"
DEFAULT_RUNC_ROOT = "/run/containerd/runc"


@dataclass(frozen=True)
class RuncOptions:
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    shim_cgroup: str = ""
    io_uid: int = 0
    io_gid: int = 0
    binary_name: str = ""
    root: str = ""
    criu_path: str = ""
    systemd_cgroup: bool = False
    criu_image_path: str = ""
    criu_work_path: str = ""

    def runc_root(self, namespace: str) -> str:
        return os.path.join(self.root or DEFAULT_RUNC_ROOT, namespace)

    def save(self, bundle: str) -> None:
        """options.json, the shim's own file: failing to write it is Internal, whatever the errno."""
        path = os.path.join(bundle, "options.json")
        try:
            with open(path, "w") as f:
                json.dump(asdict(self), f)
        except OSError as e:
            raise TTRPCError(Code.INTERNAL, f"cannot save runtime options to {path}: {e.strerror or e}") from e


_FIELDS = {f.name: f.type for f in fields(RuncOptions)}


def _bare_type(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def from_any(msg: any_pb2.Any | None) -> RuncOptions:
    """Options from the Any containerd sent; unset or empty gives the defaults."""
    if msg is None or not msg.type_url:
        return RuncOptions()
    kind = _bare_type(msg.type_url)
    try:
        if kind == RUNC_OPTIONS:
            opts = options_pb2.Options.FromString(msg.value)
            return RuncOptions(**{name: getattr(opts, name) for name in _FIELDS})
        if kind == RUNTIME_OPTIONS:
            ro = runtimeoptions_pb2.Options.FromString(msg.value)
            return from_config_file(ro.config_path) if ro.config_path else RuncOptions()
    except TTRPCError:
        raise
    except Exception as e:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid runtime options {kind}: {e}") from e
    raise TTRPCError(Code.INVALID_ARGUMENT, f"unsupported runtime options type {kind!r}")


def reads_a_file(msg: any_pb2.Any | None) -> bool:
    """Whether :func:`from_any` would read a config file (runtimeoptions with a config_path): only then
    is it worth a thread. The usual runc Options are parsed in microseconds."""
    return msg is not None and _bare_type(msg.type_url) == RUNTIME_OPTIONS


def from_bytes(data: bytes) -> RuncOptions:
    """Options from ``start``'s stdin: a marshalled Any, or nothing."""
    if not data:
        return RuncOptions()
    try:
        msg = any_pb2.Any.FromString(data)
    except Exception as e:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"runtime options on stdin are not a protobuf Any: {e}") from e
    return from_any(msg)


def from_config_file(path: str) -> RuncOptions:
    """A TOML file whose keys are Options' field names (``binary_name = "crun"``, ``root = …``)."""
    import tomllib  # here: rarely used, and the zygote would hold it for every server

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"runtime config {path}: {e}") from e
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"runtime config {path}: unknown keys {', '.join(unknown)}")
    for key, value in table.items():
        want = bool if _FIELDS[key] == "bool" else int if _FIELDS[key] == "int" else str
        if type(value) is not want:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"runtime config {path}: {key} must be {want.__name__}")
    return RuncOptions(**table)
