"""Integration tests run on the real stack; its fixtures (a private containerd, runc, a busybox rootfs
and image, the runtimes of a differential run) come from shim.testing.plugin, registered in
tests/conftest.py."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
