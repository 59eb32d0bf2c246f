"""mount(2)/umount2(2) for a container's rootfs, with containerd's option semantics.

Called through ctypes rather than /bin/mount: no fork+exec on the Create path. Options are split the
way containerd's mount package does: known words become MS_* flags, the rest is filesystem data
(overlay's lowerdir=…, upperdir=…). Not built: loop devices ("loop") and mount helpers (fuse.*),
which the snapshotters runc uses do not need; they fail with a clear error.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_REMOUNT, MS_MANDLOCK, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 32, 64, 128, 1024, 2048
MS_BIND, MS_REC, MS_SILENT, MS_RELATIME, MS_STRICTATIME = 4096, 16384, 32768, 1 << 21, 1 << 24
MS_UNBINDABLE, MS_PRIVATE, MS_SLAVE, MS_SHARED = 1 << 17, 1 << 18, 1 << 19, 1 << 20
MNT_DETACH = 2
_PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# word → (clears the flag?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS), "atime": (True, MS_NOATIME), "bind": (False, MS_BIND),
    "defaults": (False, 0), "dev": (True, MS_NODEV), "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC), "exec": (True, MS_NOEXEC), "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "nodev": (False, MS_NODEV), "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC), "nomand": (True, MS_MANDLOCK), "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME), "nosuid": (False, MS_NOSUID), "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME), "remount": (False, MS_REMOUNT), "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY), "strictatime": (False, MS_STRICTATIME), "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS), "private": (False, MS_PRIVATE), "rprivate": (False, MS_PRIVATE | MS_REC),
    "shared": (False, MS_SHARED), "rshared": (False, MS_SHARED | MS_REC), "slave": (False, MS_SLAVE),
    "rslave": (False, MS_SLAVE | MS_REC), "unbindable": (False, MS_UNBINDABLE),
    "runbindable": (False, MS_UNBINDABLE | MS_REC),
}

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """libc through ctypes, made once per process: the zygote's, for all its servers (memory.warm_up)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.prctl  # noqa: B018 - CDLL makes each function's object on first use: here, once
    return _libc


def parse_options(options: Iterable[str]) -> tuple[int, str]:
    """(MS_* flags, comma-joined filesystem data)."""
    flags, data = 0, []
    for opt in options:
        known = _FLAGS.get(opt)
        if known is not None and known[1]:
            clear, flag = known
            flags = flags & ~flag if clear else flags | flag
        elif opt == "loop":
            raise OSError(errno.ENOTSUP, "loop mounts are not supported by pyrunc")
        elif known is None:
            data.append(opt)
    return flags, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                    data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'none'} {source} on {target} ({data}): {os.strerror(err)}")


def mount(fstype: str, source: str, target: str, options: Iterable[str]) -> None:
    """One mount, as containerd's Mount.Mount: main call, propagation change, read-only bind remount."""
    if fstype.startswith("fuse."):
        raise OSError(errno.ENOTSUP, f"mount type {fstype} needs a helper, not supported by pyrunc")
    flags, data = parse_options(options)
    if len(data) > os.sysconf("SC_PAGESIZE"):
        raise OSError(errno.E2BIG, "mount options is too long")
    plain = flags & ~_PROPAGATION
    if not flags & MS_REMOUNT or data:
        _mount(source, target, fstype, plain, data)
    if flags & _PROPAGATION:
        _mount("", target, "", flags & (_PROPAGATION | MS_REC | MS_SILENT), "")
    if plain & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        _mount("", target, "", plain | MS_REMOUNT, "")


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target`` (lazily), until the kernel says nothing is left."""
    path = target.encode()
    for _ in range(64):
        if libc().umount2(path, MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                return
            raise OSError(err, f"unmount {target}: {os.strerror(err)}")
    raise OSError(errno.EBUSY, f"unmount {target}: still mounted after 64 unmounts")
