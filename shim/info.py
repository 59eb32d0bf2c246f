"""``-info``: what containerd 2.0+ learns about the runtime without starting a shim.

containerd runs ``<shim> -info`` with the runtime options Any on stdin (or nothing) when it is asked for
a runtime's PluginInfo — CRI does so, e.g. before using idmapped mounts — and reads a marshalled
``containerd.types.RuntimeInfo`` from stdout (core/runtime/v2 ``getRuntimeInfo``). As the Go shim's
``Info`` fills it: our name and version; the options echoed back, re-marshalled under their bare type
name; and the OCI runtime's ``features`` JSON (opencontainers/runtime-spec features.md) in an Any typed
the way containerd's typeurl registers runtime-spec's ``features.Features``. A runtime without a
``features`` command (runc before 1.1, youki at the time) gives no features, and no error.

Not on the hot path, so protobuf and subprocess are fine here; shim.cli imports this only for ``-info``.
"""

from __future__ import annotations

import json
import shutil
import subprocess

from google.protobuf import any_pb2

from shim.api.containerd.runc.v1 import options_pb2
from shim.api.containerd.types import introspection_pb2
from shim.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from shim.options import RUNC_OPTIONS, RUNTIME_OPTIONS, from_any
from shim.ttrpc import TTRPCError

RUNTIME_NAME = "io.containerd.pyrunc.v2"
# typeurl.Register(&features.Features{}, "types.containerd.io", "opencontainers/runtime-spec", "1",
# "features", "Features") in containerd's core/runtime: the Any's value is then the struct's JSON.
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
DEFAULT_RUNTIME = "runc"
FEATURES_TIMEOUT = 30  # seconds; containerd gives the whole -info no deadline of its own
_OPTION_MESSAGES = {RUNC_OPTIONS: options_pb2.Options, RUNTIME_OPTIONS: runtimeoptions_pb2.Options}


class InfoError(Exception):
    """Why no RuntimeInfo can be given; -info then exits 1 with it on stderr."""


def runtime_info(options: bytes, version: str, revision: str) -> introspection_pb2.RuntimeInfo:
    """The RuntimeInfo for ``options`` (a marshalled Any, or empty)."""
    info = introspection_pb2.RuntimeInfo(
        name=RUNTIME_NAME, version=introspection_pb2.RuntimeVersion(version=version, revision=revision))
    try:
        given = any_pb2.Any.FromString(options)
    except Exception as e:  # protobuf's DecodeError, whose module differs between its backends
        raise InfoError(f"failed to read runtime options: not a protobuf Any: {e}") from e
    try:
        effective = from_any(given)  # reads a runtimeoptions config file too
    except TTRPCError as e:
        raise InfoError(f"failed to read runtime options: {e.message}") from e
    if given.type_url:
        kind = given.type_url.rsplit("/", 1)[-1]
        message = _OPTION_MESSAGES[kind].FromString(given.value)  # from_any accepted it: one of these
        info.options.CopyFrom(any_pb2.Any(type_url=kind, value=message.SerializeToString()))
    name = effective.binary_name or DEFAULT_RUNTIME
    binary = shutil.which(name)
    if binary is None:
        raise InfoError(f'failed to look up the path of "{name}": executable file not found in $PATH')
    features = runtime_features(binary)
    if features is not None:
        info.features.CopyFrom(any_pb2.Any(type_url=FEATURES_TYPE_URL, value=features))
    return info


def runtime_features(binary: str) -> bytes | None:
    """``<binary> features`` as compact JSON, or None when the runtime cannot say.

    The Go shim decodes the output into runtime-spec's Features and marshals that again: the same
    object, without runc's indentation. Unknown keys are kept here (readers ignore them)."""
    try:
        done = subprocess.run([binary, "features"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=FEATURES_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        features = json.loads(done.stdout)
    except ValueError:
        return None
    if not isinstance(features, dict):
        return None
    return json.dumps(features, separators=(",", ":"), ensure_ascii=False).encode()
