"""containerd's mount option semantics (flags vs filesystem data)."""

import pytest

from shim import mount


def test_overlay_options_are_data():
    flags, data = mount.parse_options(["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/a:/b"])
    assert flags == 0
    assert data == "index=off,workdir=/w,upperdir=/u,lowerdir=/a:/b"


def test_flags_set_and_clear_in_order():
    flags, data = mount.parse_options(["rbind", "ro", "nosuid", "rw", "defaults"])
    assert flags == mount.MS_BIND | mount.MS_REC | mount.MS_NOSUID
    assert data == ""


def test_propagation_words():
    flags, _ = mount.parse_options(["bind", "rprivate"])
    assert flags == mount.MS_BIND | mount.MS_PRIVATE | mount.MS_REC


def test_loop_is_refused_clearly():
    with pytest.raises(OSError, match="loop mounts are not supported"):
        mount.parse_options(["loop"])
