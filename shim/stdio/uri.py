"""Where a process's output goes, as containerd names it in CreateTaskRequest/ExecProcessRequest.stdout.

A plain path (no scheme) is a FIFO that containerd (or another client) reads; ``binary:///path?k=v``
is a logging program fed through pipes; ``file:///path`` is a file appended to. As in the Go shim
(pkg/process/io.go, createIO) only the stdout field is looked at to choose: for a log URI the stderr
field only says whether stderr is wanted at all.
"""

from __future__ import annotations

import re
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
        return Target("binary", _path(stdout, scheme), binary_args(_split(stdout)[1]))
    raise StdioURIError(f"unknown STDIO scheme {scheme}")


def binary_args(query: str) -> tuple[str, ...]:
    """A logger's arguments from its URI's query: each key followed by its first value.

    Go (NewBinaryCmd) appends ``key, values[0]`` per key of url.Query(), so ``?flag`` gives the
    arguments ``flag, ""``. Its map has no order; we keep the order of first appearance, which is
    one of the orders Go may produce.
    """
    first: dict[str, str] = {}
    for field in query.split("&"):
        if field:
            key, _, value = field.partition("=")
            first.setdefault(_unquote(key.replace("+", " ")), _unquote(value.replace("+", " ")))
    return tuple(item for pair in first.items() for item in pair)


def _split(uri: str) -> tuple[str, str]:
    """(path, query) of ``scheme:[//host]path[?query][#fragment]``, as urllib.parse.urlsplit gives them
    (which also drops tabs and line breaks). Not urllib: it and ipaddress, which it imports, would sit in
    the zygote for every server, for the few whose output goes to a log URI."""
    for unsafe in "\t\r\n":
        uri = uri.replace(unsafe, "")
    rest = uri.split(":", 1)[1]
    if rest.startswith("//"):
        host_end = min((i for i in (rest.find(c, 2) for c in "/?#") if i >= 0), default=len(rest))
        rest = rest[host_end:]
    rest = rest.split("#", 1)[0]
    path, _, query = rest.partition("?")
    return path, query


def _unquote(text: str) -> str:
    """%XX escapes decoded as UTF-8, bad bytes replaced (urllib.parse.unquote)."""
    if "%" not in text:
        return text
    head, *pieces = text.split("%")
    out = bytearray(head.encode())
    for piece in pieces:
        code = piece[:2]
        if len(code) == 2 and all(c in "0123456789abcdefABCDEF" for c in code):
            out.append(int(code, 16))
            out += piece[2:].encode()
        else:
            out += b"%" + piece.encode()
    return out.decode("utf-8", "replace")


def _path(uri: str, scheme: str) -> str:
    path = _unquote(_split(uri)[0])
    if not path.startswith("/"):
        raise StdioURIError(f"{scheme} URI {uri!r} has no absolute path (write {scheme}:///abs/path)")
    return path
