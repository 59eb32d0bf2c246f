"""The throwaway containerd, re-exported: it lives in shim/testing/stack.py, which ships with pyrunc so
that other shims' authors can run our conformance scenarios (shim/testing/plugin.py). tests/, bench/ and
tools/try import it from here, as they did before it moved.
"""

from pathlib import Path

from shim.testing.stack import *  # noqa: F403
from shim.testing.stack import (
    BUSYBOX,
    PYRUNC,
    RUNC_V2,
    SHIM_NAME,
    PrivateContainerd,
    build_busybox_rootfs,
    build_oci_image_tar,
    missing_tools,
    shim_binary,
    shim_binary_name,
)

# This file is always in a checkout, whichever shim package Python imported above.
REPO = Path(__file__).resolve().parent.parent

__all__ = [
    "BUSYBOX",
    "PYRUNC",
    "REPO",
    "RUNC_V2",
    "SHIM_NAME",
    "PrivateContainerd",
    "build_busybox_rootfs",
    "build_oci_image_tar",
    "missing_tools",
    "shim_binary",
    "shim_binary_name",
]
