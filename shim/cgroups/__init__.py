"""Container cgroups: which one a process is in (``find``), its metrics as containerd wants them from
Task.Stats (``stats``), and OOM notifications (``OOMWatcher``). Reads follow
github.com/containerd/cgroups; v1 controllers are read through cgroupspy where it has a typed file."""

from __future__ import annotations

from google.protobuf import any_pb2

from shim.api.cgroups.v1 import metrics_pb2 as v1_pb
from shim.api.cgroups.v2 import metrics_pb2 as v2_pb
from shim.cgroups import v1, v2
from shim.cgroups.oom import OOMWatcher
from shim.cgroups.paths import Cgroup, CgroupError, CgroupV1, CgroupV2, Mode, find, join, mode

__all__ = ["Cgroup", "CgroupError", "CgroupV1", "CgroupV2", "Mode", "OOMWatcher", "find", "join", "metrics", "mode",
           "stats"]


def metrics(cgroup: Cgroup) -> v1_pb.Metrics | v2_pb.Metrics:
    """The cgroup's metrics message; missing files and controllers are left out. Raises CgroupError
    when the cgroup no longer exists, ValueError when a file does not parse."""
    if isinstance(cgroup, CgroupV1):
        return v1.metrics(cgroup)
    return v2.metrics(cgroup)


def stats(cgroup: Cgroup) -> any_pb2.Any:
    """StatsResponse.stats: type_url is the bare full name ("io.containerd.cgroups.v1.Metrics"), which
    is what containerd's typeurl registry resolves."""
    message = metrics(cgroup)
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())
