"""Which cgroup a process is in, and which cgroup version reports its metrics.

Like containerd's ``cgroups.Mode()``: a cgroup2 filesystem at /sys/fs/cgroup is a unified host (v2
metrics); anything else is legacy or hybrid, and hybrid hosts still report v1 metrics — their v2
hierarchy at /sys/fs/cgroup/unified holds no resource controllers worth reporting."""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from shim.cgroups._linux import CGROUP2_SUPER_MAGIC, fs_type

log = logging.getLogger("pyrunc")

ROOT = "/sys/fs/cgroup"
PROC = "/proc"
# The v1 controllers that have metrics (the Go library's stater subsystems we report).
V1_CONTROLLERS = ("pids", "cpu", "cpuacct", "memory", "blkio", "hugetlb")


class CgroupError(Exception):
    """The process has no cgroup we can read (gone, or no cgroup filesystem)."""


class Mode(enum.Enum):
    UNAVAILABLE = "unavailable"
    LEGACY = "legacy"
    HYBRID = "hybrid"
    UNIFIED = "unified"


@functools.cache
def mode(root: str = ROOT) -> Mode:
    """The host's cgroup mode; it cannot change while we run, so it is computed once per root."""
    try:
        if fs_type(root) == CGROUP2_SUPER_MAGIC:
            return Mode.UNIFIED
    except OSError:
        return Mode.UNAVAILABLE
    try:
        return Mode.HYBRID if fs_type(os.path.join(root, "unified")) == CGROUP2_SUPER_MAGIC else Mode.LEGACY
    except OSError:
        return Mode.LEGACY


@dataclass(frozen=True)
class CgroupV1:
    """A cgroup in the v1 hierarchies: each controller's path inside its hierarchy (e.g. "/default/c1"),
    mounted at ``root/<controller>``. Only controllers whose directory existed when found are listed."""

    root: str
    paths: Mapping[str, str]
    proc: str = PROC  # for /proc/partitions (blkio device names)

    def dir(self, controller: str) -> str:
        return os.path.join(self.root, controller, self.paths[controller].lstrip("/"))


@dataclass(frozen=True)
class CgroupV2:
    """A cgroup in the unified hierarchy: its directory."""

    path: str


Cgroup = CgroupV1 | CgroupV2


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """/proc/<pid>/cgroup: ({v1 controller or "name=x": path}, the unified "0::" path or None)."""
    controllers: dict[str, str] = {}
    unified = None
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise CgroupError(f"invalid cgroup entry: {line!r}")
        _, names, path = parts
        if names == "":
            unified = path
            continue
        for name in names.split(","):
            controllers[name] = path
    return controllers, unified


_OCTAL = re.compile(r"\\([0-7]{3})")


def v1_mount_roots(mountinfo: str) -> dict[str, str]:
    """For each v1 controller, the hierarchy path mounted (mountinfo's "root" field). It is not "/" in a
    container without a cgroup namespace, where /proc/<pid>/cgroup paths must be made relative to it."""
    roots: dict[str, str] = {}
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] != "cgroup":
            continue
        root = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[3])
        for option in tail[2].split(","):
            roots.setdefault(option, root)  # the first mount wins, as in the Go library
    return roots


def _localize(path: str, mount_root: str) -> str:
    if mount_root in ("", "/"):
        return path
    if path == mount_root:
        return "/"
    if path.startswith(mount_root + "/"):
        return path[len(mount_root):]
    return path


def find(pid: int, root: str = ROOT, proc: str = PROC, cgroup_mode: Mode | None = None) -> Cgroup:
    """The cgroup of ``pid`` (read from ``proc``/<pid>/cgroup), under ``root``. ``cgroup_mode`` defaults
    to the host's; tests pass it with fixture trees. Raises CgroupError when there is none to read."""
    cgroup_mode = cgroup_mode or mode(root)
    if cgroup_mode is Mode.UNAVAILABLE:
        raise CgroupError(f"no cgroup filesystem at {root}")
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            controllers, unified = parse_proc_cgroup(f.read())
    except OSError as e:
        raise CgroupError(f"cgroup of pid {pid}: {e.strerror}") from e
    if cgroup_mode is Mode.UNIFIED:
        if unified is None:
            raise CgroupError(f"pid {pid} has no unified cgroup")
        path = os.path.join(root, unified.lstrip("/"))
        if not os.path.isdir(path):
            raise CgroupError(f"cgroup {path} of pid {pid} does not exist")
        return CgroupV2(path)
    try:
        with open(os.path.join(proc, "self", "mountinfo")) as f:
            mount_roots = v1_mount_roots(f.read())
    except FileNotFoundError:
        mount_roots = {}
    paths = {}
    for name in V1_CONTROLLERS:
        if name in controllers:
            path = _localize(controllers[name], mount_roots.get(name, "/"))
            if os.path.isdir(os.path.join(root, name, path.lstrip("/"))):
                paths[name] = path
    if not paths:
        raise CgroupError(f"cgroup of pid {pid} does not exist (deleted?)")
    return CgroupV1(root, paths, proc)


def join(path: str, root: str = ROOT) -> list[str]:
    """Move this shim into the cgroup ``path`` (Options.shim_cgroup) in every hierarchy that has it: the
    unified one, or each v1 controller's. Where it does not exist nothing is created, as with the Go shim."""
    rel = path.strip("/")
    candidates = [os.path.join(root, rel)] + [os.path.join(root, d, rel) for d in sorted(os.listdir(root))]
    joined = []
    for cg in candidates:
        procs = os.path.join(cg, "cgroup.procs")
        if os.path.isfile(procs):
            try:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
                joined.append(cg)
            except OSError as e:
                log.warning("cannot move the shim into %s: %s", cg, e)
    if not joined:
        log.error("shim_cgroup %s exists in no cgroup hierarchy under %s", path, root)
    return joined
