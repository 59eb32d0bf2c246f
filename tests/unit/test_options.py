"""Runtime options from containerd: runc Options, runtimeoptions config files, bad input."""

import json

import pytest
from google.protobuf import any_pb2

from shim.api.containerd.runc.v1 import options_pb2
from shim.api.runtimeoptions.v1 import api_pb2
from shim.options import RuncOptions, from_any, from_bytes, reads_a_file
from shim.ttrpc import Code, TTRPCError


def pack(msg) -> any_pb2.Any:
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def test_runc_options_any():
    opts = from_any(pack(options_pb2.Options(binary_name="crun", root="/r", systemd_cgroup=True, io_uid=5)))
    assert (opts.binary_name, opts.root, opts.systemd_cgroup, opts.io_uid) == ("crun", "/r", True, 5)
    assert opts.runc_root("ns") == "/r/ns"


def test_prefixed_type_url_and_empty():
    msg = pack(options_pb2.Options(no_pivot_root=True))
    msg.type_url = "type.googleapis.com/" + msg.type_url
    assert from_any(msg).no_pivot_root
    assert from_bytes(b"") == RuncOptions()
    assert from_bytes(msg.SerializeToString()).no_pivot_root


def test_runtimeoptions_config_file(tmp_path):
    cfg = tmp_path / "pyrunc.toml"
    cfg.write_text('binary_name = "crun"\nno_new_keyring = true\n')
    opts = from_any(pack(api_pb2.Options(config_path=str(cfg))))
    assert (opts.binary_name, opts.no_new_keyring) == ("crun", True)
    assert opts.runc_root("default") == "/run/containerd/runc/default"


def test_only_runtimeoptions_read_a_file(tmp_path):
    assert reads_a_file(pack(api_pb2.Options(config_path=str(tmp_path / "x.toml"))))
    assert not reads_a_file(pack(options_pb2.Options(binary_name="crun")))
    assert not reads_a_file(None)


@pytest.mark.parametrize("content", ['nope = 1\n', 'binary_name = 3\n', 'not toml ==='])
def test_bad_config_file_is_invalid_argument(tmp_path, content):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    with pytest.raises(TTRPCError) as e:
        from_any(pack(api_pb2.Options(config_path=str(cfg))))
    assert e.value.code == Code.INVALID_ARGUMENT


def test_unknown_type_and_garbage_are_invalid_argument():
    with pytest.raises(TTRPCError) as e:
        from_any(any_pb2.Any(type_url="example.Other", value=b""))
    assert e.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(TTRPCError) as e:
        from_bytes(b"\xff\xff\xff")
    assert e.value.code == Code.INVALID_ARGUMENT


def test_save_for_delete(tmp_path):
    RuncOptions(binary_name="crun", root="/x").save(str(tmp_path))
    saved = json.loads((tmp_path / "options.json").read_text())
    assert saved["binary_name"] == "crun" and saved["root"] == "/x"
