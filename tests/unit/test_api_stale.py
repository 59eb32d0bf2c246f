"""shim/api/ must be exactly what `python tools/genproto.py` generates from protos/."""

from __future__ import annotations

import importlib

import pytest

from tools import genproto


def test_shim_api_is_not_stale(tmp_path):
    out = tmp_path / "api"
    genproto.generate(out)
    differences = genproto.diff_trees(out, genproto.API_DIR, context=True)
    assert not differences, f"shim/api/ differs from what protos/ generates; run `{genproto.COMMAND}`:\n" + "\n".join(
        differences
    )


def test_generation_is_deterministic(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert genproto.generate(first) == genproto.generate(second)
    assert genproto.diff_trees(first, second) == []


def test_generated_modules_import_from_shim_api():
    for proto in genproto.proto_files():
        name = genproto.api_module(proto)
        module = importlib.import_module(name)
        assert module.DESCRIPTOR.name == proto
        for message in module.DESCRIPTOR.message_types_by_name:
            assert getattr(module, message).__module__ == name


def test_rewrite_imports_only_touches_our_modules():
    own = {"containerd.types.mount_pb2"}
    text = (
        "from google.protobuf import any_pb2 as google_dot_protobuf_dot_any__pb2\n"
        "from containerd.types import mount_pb2 as containerd_dot_types_dot_mount__pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'containerd.types.mount_pb2', _globals)\n"
    )
    assert genproto.rewrite_imports(text, own) == (
        "from google.protobuf import any_pb2 as google_dot_protobuf_dot_any__pb2\n"
        "from shim.api.containerd.types import mount_pb2 as containerd_dot_types_dot_mount__pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'shim.api.containerd.types.mount_pb2', _globals)\n"
    )


def test_a_derived_proto_needs_exactly_one_package_line(tmp_path):
    (name, (origin, old, new)), = genproto.DERIVED.items()
    (tmp_path / origin).parent.mkdir(parents=True)
    (tmp_path / origin).write_text(f'syntax = "proto3";\npackage {old};\nmessage M {{}}\n')
    assert f"package {new};" in genproto.derived_source(name, tmp_path)
    (tmp_path / origin).write_text('syntax = "proto3";\nmessage M {}\n')
    with pytest.raises(genproto.ProtocError, match="exactly one"):
        genproto.derived_source(name, tmp_path)
