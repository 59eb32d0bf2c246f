"""The conformance scenarios of shim.testing, run for pyrunc: the subject is --runtime (default
io.containerd.pyrunc.v2), the oracle --oracle (default io.containerd.runc.v2, the Go shim)."""

from shim.testing.conformance import *  # noqa: F403
