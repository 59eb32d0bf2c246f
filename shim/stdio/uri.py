"""Where a process's output goes, as containerd names it in CreateTaskRequest/ExecProcessRequest.stdout.

A plain path (no scheme) is a FIFO that containerd (or another client) reads; ``binary:///path?k=v``
is a logging program fed through pipes; ``file:///path`` is a file appended to. As in the Go shim
(pkg/process/io.go, createIO) only the stdout field is looked at to choose: for a log URI the stderr
field only says whether stderr is wanted at all.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

# RFC 3986 scheme; Go's url.Parse only sees a scheme before the first ':' when it looks like this.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class StdioURIError(ValueError):
    """A stdout value that names no usable destination (the message is the Go shim's wording)."""


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "null" (nothing given), "fifo", "binary" or "file"
    path: str = ""
    args: tuple[str, ...] = ()  # a binary logger's arguments


def parse(stdout: str) -> Target:
    """The destination named by a stdout field. Raises :class:`StdioURIError` for unknown schemes."""
    if not stdout:
        return Target("null")
    m = _SCHEME.match(stdout)
    if m is None:
        return Target("fifo", stdout)  # a path, used as it is (Go does not unescape it either)
    scheme = m.group(1).lower()
    if scheme == "fifo":
        return Target("fifo", _path(stdout, scheme))
    if scheme == "file":
        return Target("file", _path(stdout, scheme))
    if scheme == "binary":
        return Target("binary", _path(stdout, scheme), binary_args(urllib.parse.urlsplit(stdout).query))
    raise StdioURIError(f"unknown STDIO scheme {scheme}")


def binary_args(query: str) -> tuple[str, ...]:
    """A logger's arguments from its URI's query: each key followed by its first value.

    Go (NewBinaryCmd) appends ``key, values[0]`` per key of url.Query(), so ``?flag`` gives the
    arguments ``flag, ""``. Its map has no order; we keep the order of first appearance, which is
    one of the orders Go may produce.
    """
    args: list[str] = []
    for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        args.append(key)
        if values:
            args.append(values[0])
    return tuple(args)


def _path(uri: str, scheme: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
    if not path.startswith("/"):
        raise StdioURIError(f"{scheme} URI {uri!r} has no absolute path (write {scheme}:///abs/path)")
    return path
