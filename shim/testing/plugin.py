"""pytest plugin: a private containerd, a busybox image and the two runtimes of a differential run.

    python -m pytest -p shim.testing.plugin --pyargs shim.testing.conformance --runtime io.containerd.foo.v2

``--runtime TYPE`` is the shim under test (the subject, default io.containerd.pyrunc.v2), ``--oracle TYPE``
the shim whose behaviour is right by definition (default io.containerd.runc.v2, containerd's Go shim).
containerd finds a runtime's binary as it always does: ``containerd-shim-<name>-<version>`` on its PATH
(the private containerd inherits the PATH of pytest, our own shim linked in front), or a TYPE that is an
absolute path to the binary.

Fixtures (session-scoped): ``stack_available`` (skips when not root or containerd, ctr, runc, the Go
shim or static busybox is missing), ``containerd`` (a started :class:`PrivateContainerd`),
``busybox_rootfs``, ``busybox_image`` (its ref, imported and unpacked) and ``runtimes``
(``{"oracle": TYPE, "subject": TYPE}``, the oracle first, as :func:`shim.testing.helpers.same` wants).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports them: the scenarios' asserts and same() then explain a difference with both
# values, also when the scenarios are imported into another test module (pytest rewrites only test files).
pytest.register_assert_rewrite("shim.testing.conformance", "shim.testing.helpers")

from shim.testing.stack import (  # noqa: E402
    PYRUNC,
    RUNC_V2,
    PrivateContainerd,
    build_busybox_rootfs,
    build_oci_image_tar,
    missing_tools,
    shim_binary_name,
)

IMAGE_REF = "localhost/pyrunc-test/busybox:latest"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shim conformance", "differential runs of a containerd shim (shim.testing)")
    group.addoption("--runtime", default=PYRUNC, metavar="TYPE",
                    help=f"runtime type of the shim under test (default {PYRUNC}); its binary "
                         "containerd-shim-<name>-<version> must be on PATH, or give its absolute path")
    group.addoption("--oracle", default=RUNC_V2, metavar="TYPE",
                    help=f"runtime type whose results the shim under test must equal (default {RUNC_V2})")


def pytest_report_header(config: pytest.Config) -> str:
    return f"shim conformance: subject {config.getoption('runtime')}, oracle {config.getoption('oracle')}"


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


@pytest.fixture(scope="session")
def runtimes(pytestconfig: pytest.Config, containerd) -> dict[str, str]:
    chosen = {"oracle": pytestconfig.getoption("oracle"), "subject": pytestconfig.getoption("runtime")}
    # Checked here, not left to the first scenario: containerd's own error names no place it looked.
    for role, runtime in chosen.items():
        if containerd.resolve_runtime(runtime) is None:
            name = shim_binary_name(runtime)
            where = f"put {name} on PATH" if name else "name it io.containerd.<name>.<version> or give a path"
            pytest.fail(f"{role} runtime {runtime}: containerd would find no shim binary for it ({where})",
                        pytrace=False)
    return chosen
