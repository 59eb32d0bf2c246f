"""New files and directories under go-runc's temp dir, without the tempfile module.

go-runc puts exec's process.json and the console socket's directory in ``$XDG_RUNTIME_DIR``, else the
temp dir (os.CreateTemp / os.MkdirTemp). tempfile would do, but it and the modules it imports (random,
shutil …) would sit in the zygote for every server, and its first call in a process seeds a generator
and test-writes a file in each candidate directory. A random name, created exclusively, is as safe in a
shared /tmp.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def runtime_dir() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"


def create(prefix: str, suffix: str, make: Callable[[str], T]) -> tuple[str, T]:
    """``make(path)`` for a new random ``path`` under :func:`runtime_dir`, again while it raises
    FileExistsError; the path and what ``make`` returned."""
    while True:
        path = os.path.join(runtime_dir(), f"{prefix}{os.urandom(8).hex()}{suffix}")
        try:
            return path, make(path)
        except FileExistsError:
            continue
