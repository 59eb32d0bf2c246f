"""Fixtures that start the real stack: a private containerd, runc, a busybox rootfs and image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.stack import PrivateContainerd, build_busybox_rootfs, build_oci_image_tar, missing_tools

IMAGE_REF = "localhost/pyrunc-test/busybox:latest"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack_available() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: runc and containerd's mounts need it")
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install containerd runc busybox-static")


@pytest.fixture(scope="session")
def containerd(stack_available):
    stack = PrivateContainerd().start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture(scope="session")
def busybox_image(containerd, busybox_rootfs, tmp_path_factory) -> str:
    tar = build_oci_image_tar(busybox_rootfs, tmp_path_factory.mktemp("image") / "busybox.tar", IMAGE_REF)
    containerd.ctr("image", "import", "--no-unpack", str(tar))
    for snapshotter in ("overlayfs",):
        containerd.ctr("image", "unpack", "--snapshotter", snapshotter, IMAGE_REF, check=False)
    return IMAGE_REF
