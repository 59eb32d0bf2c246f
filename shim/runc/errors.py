"""Errors from runc invocations, with runc's own message recovered from its JSON log."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


class RuncError(Exception):
    """A runc command exited non-zero.

    ``message`` is the last ``"level":"error"`` entry runc appended to its log during the call, else
    its stderr (else stdout) output; ``str()`` reads like containerd's: ``runc create failed: <msg>``.
    """

    def __init__(self, command: str, argv: Sequence[str], status: int, message: str) -> None:
        self.command = command
        self.argv = list(argv)
        self.status = status
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        program = os.path.basename(self.argv[0]) if self.argv else "runc"
        return f"{program} {self.command} failed: {self.message or f'exit status {self.status}'}"

    @property
    def not_found(self) -> bool:
        """The container does not exist (the service answers gRPC NotFound).

        runc and crun both say "container ... does not exist". A bare "not found" is not enough: that is
        also how a failed exec of a missing binary reads ("executable file not found in $PATH").
        """
        return "does not exist" in self.message

    @property
    def not_running(self) -> bool:
        """The container or process has already stopped (a kill after the exit, for instance)."""
        message = self.message.lower()
        return "not running" in message or "no such process" in message or "already finished" in message


def log_offset(path: str | None) -> int:
    """Where runc's next log lines will start: note it before the call, read from it after."""
    if path is None:
        return 0
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def last_log_error(path: str, offset: int) -> str:
    """The ``msg`` of the last ``"level":"error"`` JSON line appended to ``path`` since ``offset``."""
    try:
        with open(path, "rb") as f:
            if offset > os.fstat(f.fileno()).st_size:
                offset = 0  # truncated meanwhile: everything in it is new
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    message = ""
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn or foreign line must not hide the error
        if isinstance(entry, dict) and entry.get("level") == "error":
            message = str(entry.get("msg", "")).strip()
    return message
