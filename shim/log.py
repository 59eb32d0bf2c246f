"""logrus-style text logs, written to the bundle's ``log`` FIFO that containerd copies into its own log.

A line looks like what the Go shims write, so one grep fits both::

    time="2026-11-21T23:47:22.123456000Z" level=info msg="shim serving" namespace=default pid=42

Extra key=value pairs come from ``logger.info(msg, extra={"fields": {...}})``; an exception becomes
``error="…"``. Writes never block (the server logs from its event loop): when the FIFO is full the line
is dropped and counted, and the count rides on the next line that gets through.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

LOG_FIFO = "log"  # in the bundle, created by containerd before it runs the shim
DROPPED_FIELD = "dropped_log_lines"

# logrus' level names; Python's CRITICAL is what logrus calls fatal.
_LEVELS = ((logging.DEBUG - 1, "trace"), (logging.DEBUG, "debug"), (logging.INFO, "info"),
           (logging.WARNING, "warning"), (logging.ERROR, "error"))

# The characters logrus leaves unquoted (TextFormatter.needsQuoting).
_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._/@^+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
            "\t": "\\t", "\v": "\\v"}


def level_name(levelno: int) -> str:
    for limit, name in _LEVELS:
        if levelno <= limit:
            return name
    return "fatal"


def _go_quote(text: str) -> str:
    """Go's %q, which logrus uses: one line, printable, with Go escapes."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _value(value: object) -> str:
    # Go prints its values: true/false and <nil>, not Python's True/None.
    if value is None:
        text = "<nil>"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if all(ch in _BARE for ch in text):  # an empty value stays bare too, as in logrus
        return text
    return _go_quote(text)


def rfc3339_nano(ns: int) -> str:
    """containerd's RFC3339NanoFixed in UTC: always nine fractional digits."""
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def format_entry(ns: int, level: str, msg: str, fields: Mapping[str, object] | None = None) -> str:
    """One logrus text line (no newline); fields are sorted by key as logrus does."""
    fields = fields or {}
    parts = [f'time="{rfc3339_nano(ns)}"', f"level={level}", f"msg={_value(msg)}"]
    parts += [f"{key}={_value(fields[key])}" for key in sorted(fields)]
    return " ".join(parts)


def format_line(record: logging.LogRecord, extra: Mapping[str, object] | None = None) -> str:
    """A LogRecord as a logrus line; ``extra`` adds fields (the handler's drop count)."""
    fields: dict[str, object] = dict(getattr(record, "fields", None) or {})
    if record.exc_info and record.exc_info[0] is not None:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    elif record.exc_text:
        fields["error"] = record.exc_text
    if record.stack_info:
        fields["stack"] = record.stack_info
    fields.update(extra or {})
    # record.created is a float; microseconds is all of it that is exact.
    ns = getattr(record, "created_ns", None) or round(record.created * 1_000_000) * 1000
    return format_entry(ns, level_name(record.levelno), record.getMessage(), fields)


class FifoHandler(logging.Handler):
    """Writes whole lines to a non-blocking fd; drops (and counts) what would block.

    A line is never split across another: if the pipe took only part of one, the rest goes out before
    anything else, and new lines are dropped until it has.
    """

    def __init__(self, fd: int, owns_fd: bool = True) -> None:
        super().__init__()
        self.fd = fd
        self.owns_fd = owns_fd
        self.dropped = 0
        self._pending = b""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._pending:
                self._pending = self._pending[self._send(self._pending):]
                if self._pending:
                    self.dropped += 1
                    return
            extra = {DROPPED_FIELD: self.dropped} if self.dropped else None
            line = (format_line(record, extra) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        sent = self._send(line)
        if sent:
            self.dropped = 0  # the count went out with this line
            self._pending = line[sent:]
        else:
            self.dropped += 1

    def _send(self, data: bytes) -> int:
        try:
            return os.write(self.fd, data)
        except OSError:
            # EAGAIN: the FIFO is full. EPIPE: nobody reads it (Python ignores SIGPIPE). Neither may
            # stop the shim, and there is nowhere else to report them.
            return 0

    def close(self) -> None:
        try:
            if self.owns_fd and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        finally:
            super().close()


def open_fifo(bundle: str) -> int | None:
    """The bundle's log FIFO opened for non-blocking writes, or None when it cannot be."""
    try:
        # containerd holds the FIFO open read-write, so a reader exists and this does not fail with
        # ENXIO; O_NONBLOCK is what keeps a slow containerd from stalling the shim.
        return os.open(os.path.join(bundle, LOG_FIFO), os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_CLOEXEC)
    except OSError:
        return None


def setup(bundle: str, debug: bool) -> None:
    """Route the root logger to the bundle's log FIFO (stderr if there is none). Safe to call again."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, FifoHandler)]:
        root.removeHandler(old)
        old.close()
    fd = open_fifo(bundle)
    # stderr is not made non-blocking: its file description may be shared with a terminal.
    handler = FifoHandler(fd) if fd is not None else FifoHandler(2, owns_fd=False)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
