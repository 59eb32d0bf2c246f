"""The few libc calls Python's os module lacks: statfs(2)'s f_type and inotify(7)."""

from __future__ import annotations

import ctypes
import os
import struct

CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000  # the watch is gone: file deleted or watch removed
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class _Statfs(ctypes.Structure):
    # f_type is the first member of struct statfs (__fsword_t, a long on the 64-bit ABIs we run on);
    # the padding is larger than the rest of the struct on every architecture.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def fs_type(path: str) -> int:
    """The filesystem magic of ``path`` (statfs f_type); OSError if it cannot be stat'ed."""
    buf = _Statfs()
    _check(_libc.statfs(os.fsencode(path), ctypes.byref(buf)), "statfs", path)
    return buf.f_type & 0xFFFFFFFF


def inotify_watch(path: str, mask: int) -> int:
    """A new non-blocking, close-on-exec inotify fd watching ``path`` for ``mask``."""
    fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
    try:
        _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), "inotify_add_watch", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def inotify_drain(fd: int) -> int:
    """Read every queued event; return the union of their masks (0 if none was queued)."""
    mask = 0
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return mask
        if not data:
            return mask
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, event_mask, _, name_len = _EVENT.unpack_from(data, offset)
            mask |= event_mask
            offset += _EVENT.size + name_len
