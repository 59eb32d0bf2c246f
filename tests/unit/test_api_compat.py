"""Our protos must be wire-identical to containerd 1.6's.

Upstream .proto files come from Debian's golang-github-containerd-containerd-dev (and the cgroups,
gogo-protobuf and gogo-googleapis -dev packages it pulls in). They are compiled with grpc_tools'
protoc into descriptor sets and compared field by field with the descriptors of our generated
modules. ttrpc's Request/Response/KeyValue only exist upstream as Go structs: they are checked
against the struct tags of ttrpc's types.go and against hand-encoded bytes.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tools import genproto

FDP = descriptor_pb2.FieldDescriptorProto

GOCODE = Path("/usr/share/gocode/src")
CONTAINERD = GOCODE / "github.com/containerd/containerd"
GOGO_PROTOBUF = GOCODE / "github.com/gogo/protobuf"  # gogoproto/gogo.proto
GOGO_GOOGLEAPIS = GOCODE / "github.com/gogo/googleapis"  # google/rpc/status.proto
TTRPC_TYPES_GO = GOCODE / "github.com/containerd/ttrpc/types.go"
SKIP_REASON = (
    f"{CONTAINERD} is absent: install golang-github-containerd-containerd-dev "
    "(Debian; it brings the cgroups and gogo-protobuf -dev packages) to compare with upstream"
)

# Our file -> the upstream file it mirrors (import name under /usr/share/gocode/src).
_CTRD = "github.com/containerd/containerd"
_CGROUPS = "github.com/containerd/cgroups"
MIRRORS = {
    "containerd/task/v2/shim.proto": f"{_CTRD}/runtime/v2/task/shim.proto",
    "containerd/types/mount.proto": f"{_CTRD}/api/types/mount.proto",
    "containerd/types/task.proto": f"{_CTRD}/api/types/task/task.proto",
    "containerd/events/task.proto": f"{_CTRD}/api/events/task.proto",
    "containerd/services/ttrpc/events/v1/events.proto": f"{_CTRD}/api/services/ttrpc/events/v1/events.proto",
    "containerd/runc/v1/options.proto": f"{_CTRD}/runtime/v2/runc/options/oci.proto",
    "runtimeoptions/v1/api.proto": f"{_CTRD}/pkg/runtimeoptions/v1/api.proto",
    "cgroups/v1/metrics.proto": f"{_CGROUPS}/stats/v1/metrics.proto",
    "cgroups/v2/metrics.proto": f"{_CGROUPS}/v2/stats/metrics.proto",
}
# Our files without an upstream .proto in containerd 1.6, and how they are checked instead.
OTHER_CHECKS = {
    "containerd/task/v3/shim.proto": "derived from our containerd.task.v2 by genproto: same but for the package",
    "google/rpc/status.proto": "gogo/googleapis' google/rpc/status.proto, else explicit numbers",
    "ttrpc/ttrpc.proto": "ttrpc types.go struct tags, explicit numbers and hand-encoded bytes",
    "containerd/runtime/bootstrap/v1/bootstrap.proto": "explicit numbers from containerd v2.3.0 (NEWER below)",
    "containerd/types/introspection.proto": "explicit numbers from containerd v2.0+ (NEWER below)",
}
# Upstream types or fields (full names) we deliberately leave out, with the reason.
ALLOWED_MISSING: dict[str, str] = {}

# google.rpc.Status and the ttrpc messages, as given by ttrpc's types.go and googleapis.
EXPLICIT = {
    "google.rpc.Status": {
        "code": (1, FDP.TYPE_INT32, FDP.LABEL_OPTIONAL, ""),
        "message": (2, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, ""),
        "details": (3, FDP.TYPE_MESSAGE, FDP.LABEL_REPEATED, ".google.protobuf.Any"),
    },
    "ttrpc.Request": {
        "service": (1, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, ""),
        "method": (2, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, ""),
        "payload": (3, FDP.TYPE_BYTES, FDP.LABEL_OPTIONAL, ""),
        "timeout_nano": (4, FDP.TYPE_INT64, FDP.LABEL_OPTIONAL, ""),
        "metadata": (5, FDP.TYPE_MESSAGE, FDP.LABEL_REPEATED, ".ttrpc.KeyValue"),
    },
    "ttrpc.Response": {
        "status": (1, FDP.TYPE_MESSAGE, FDP.LABEL_OPTIONAL, ".google.rpc.Status"),
        "payload": (2, FDP.TYPE_BYTES, FDP.LABEL_OPTIONAL, ""),
    },
    "ttrpc.KeyValue": {
        "key": (1, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, ""),
        "value": (2, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, ""),
    },
}


# --- descriptors -------------------------------------------------------------------------------


def ours(proto: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of our generated module for protos/<proto>."""
    module = importlib.import_module(genproto.api_module(proto))
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def compile_upstream(tmp_dir: Path, name: str, include_dirs: list[Path]) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_dir / (name.replace("/", "_") + ".pb")
    fds = genproto.descriptor_set([name], [*include_dirs, genproto.grpc_tools_include()], out)
    (fdp,) = (f for f in fds.file if f.name == name)
    return fdp


def top_level(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """Messages, enums and services of a file by full name."""
    prefix = f"{fdp.package}." if fdp.package else ""
    return {prefix + t.name: t for t in (*fdp.message_type, *fdp.enum_type, *fdp.service)}


def field_sig(field: descriptor_pb2.FieldDescriptorProto) -> tuple:
    """Everything about a field that shapes the wire format or the generated API."""
    packed = field.options.packed if field.options.HasField("packed") else None
    oneof = field.oneof_index if field.HasField("oneof_index") else None
    sig = (field.number, field.type, field.label, field.type_name)
    return (*sig, packed, oneof, field.proto3_optional, field.default_value)


def show(sig: tuple) -> str:
    number, type_, label, type_name, *rest = sig
    kind = type_name or FDP.Type.Name(type_)
    return f"{FDP.Label.Name(label)} {kind} = {number} {rest}"


def compare_enum(full: str, mine, theirs) -> list[str]:
    a = {v.name: v.number for v in mine.value}
    b = {v.name: v.number for v in theirs.value}
    return [f"enum {full}: ours {a} != upstream {b}"] if a != b else []


def compare_service(full: str, mine, theirs) -> list[str]:
    def methods(svc):
        return {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in svc.method}

    a, b = methods(mine), methods(theirs)
    problems = [f"service {full}: method {n} not upstream" for n in sorted(a.keys() - b.keys())]
    problems += [f"service {full}: upstream method {n} missing" for n in sorted(b.keys() - a.keys())]
    problems += [
        f"service {full}.{n}: ours {a[n]} != upstream {b[n]}" for n in sorted(a.keys() & b.keys()) if a[n] != b[n]
    ]
    return problems


def compare_message(full: str, mine, theirs) -> list[str]:
    problems = []
    if mine.options.map_entry != theirs.options.map_entry:
        problems.append(f"{full}: map_entry differs")
    a = {f.name: field_sig(f) for f in mine.field}
    b = {f.name: field_sig(f) for f in theirs.field}
    for name in sorted(a.keys() - b.keys()):
        problems.append(f"{full}.{name}: not upstream")
    for name in sorted(b.keys() - a.keys()):
        if f"{full}.{name}" not in ALLOWED_MISSING:
            problems.append(f"{full}.{name}: upstream field missing ({show(b[name])})")
    for name in sorted(a.keys() & b.keys()):
        if a[name] != b[name]:
            problems.append(f"{full}.{name}: ours {show(a[name])} != upstream {show(b[name])}")
    problems += compare_nested(full, mine, theirs)
    return problems


def compare_nested(full: str, mine, theirs) -> list[str]:
    problems = []
    for kind, compare in (("nested_type", compare_message), ("enum_type", compare_enum)):
        a = {t.name: t for t in getattr(mine, kind)}
        b = {t.name: t for t in getattr(theirs, kind)}
        for name in sorted(a.keys() ^ b.keys()):
            where = "ours only" if name in a else "upstream only"
            if name in a or f"{full}.{name}" not in ALLOWED_MISSING:
                problems.append(f"{full}.{name}: {where}")
        for name in sorted(a.keys() & b.keys()):
            problems += compare(f"{full}.{name}", a[name], b[name])
    return problems


def compare_types(full: str, mine, theirs) -> list[str]:
    if type(mine) is not type(theirs):
        return [f"{full}: ours is a {type(mine).__name__}, upstream a {type(theirs).__name__}"]
    if isinstance(mine, descriptor_pb2.DescriptorProto):
        return compare_message(full, mine, theirs)
    if isinstance(mine, descriptor_pb2.EnumDescriptorProto):
        return compare_enum(full, mine, theirs)
    return compare_service(full, mine, theirs)


def compare_files(mine: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto):
    """Every type of ours must exist upstream identically, and every upstream type in ours."""
    problems = []
    if mine.package != theirs.package:
        problems.append(f"{mine.name}: package {mine.package!r} != upstream {theirs.package!r}")
    if mine.syntax != theirs.syntax:
        problems.append(f"{mine.name}: syntax {mine.syntax!r} != upstream {theirs.syntax!r}")
    a, b = top_level(mine), top_level(theirs)
    for full in sorted(a.keys() - b.keys()):
        problems.append(f"{full}: no upstream counterpart in {theirs.name}")
    for full in sorted(b.keys() - a.keys()):
        if full not in ALLOWED_MISSING:
            problems.append(f"{full}: upstream type missing from {mine.name}")
    for full in sorted(a.keys() & b.keys()):
        problems += compare_types(full, a[full], b[full])
    return problems


def explicit_problems(fdp: descriptor_pb2.FileDescriptorProto, expected: dict[str, dict]) -> list[str]:
    problems = []
    types = top_level(fdp)
    for full, fields in expected.items():
        if full not in types:
            problems.append(f"{full}: missing from {fdp.name}")
            continue
        got = {f.name: field_sig(f)[:4] for f in types[full].field}
        if got != fields:
            problems.append(f"{full}: ours {got} != expected {fields}")
    return problems


# --- upstream ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Our file name -> upstream FileDescriptorProto of the file it mirrors."""
    if not CONTAINERD.is_dir():
        pytest.skip(SKIP_REASON)
    tmp = tmp_path_factory.mktemp("upstream")
    missing = [name for name in MIRRORS.values() if not (GOCODE / name).is_file()]
    assert not missing, f"upstream files absent (install the matching golang-*-dev package): {missing}"
    # Each file gets its own protoc run: they import gogo.proto under two different names.
    return {mine: compile_upstream(tmp, name, [GOCODE, GOGO_PROTOBUF]) for mine, name in MIRRORS.items()}


def test_every_proto_file_is_checked():
    files = set(genproto.proto_files())
    assert files == MIRRORS.keys() | OTHER_CHECKS.keys(), (
        "add new protos/ files to MIRRORS or OTHER_CHECKS in this test"
    )


@pytest.mark.parametrize("mine", sorted(MIRRORS))
def test_matches_upstream(upstream, mine):
    problems = compare_files(ours(mine), upstream[mine])
    assert not problems, "\n".join(problems)


def test_same_full_names_across_files_match(upstream):
    """Each of our types that exists anywhere upstream (by full name) is identical to it."""
    theirs = {full: t for fdp in upstream.values() for full, t in top_level(fdp).items()}
    problems, matched = [], 0
    for proto in genproto.proto_files():
        for full, mine in top_level(ours(proto)).items():
            if full in theirs:
                matched += 1
                problems += compare_types(full, mine, theirs[full])
    assert not problems, "\n".join(problems)
    assert matched >= 60


def test_task_and_events_services(upstream):
    task = top_level(ours("containerd/task/v2/shim.proto"))["containerd.task.v2.Task"]
    assert len(task.method) == 17
    up_task = top_level(upstream["containerd/task/v2/shim.proto"])["containerd.task.v2.Task"]
    events_file = "containerd/services/ttrpc/events/v1/events.proto"
    events = top_level(ours(events_file))["containerd.services.events.ttrpc.v1.Events"]
    up_events = top_level(upstream[events_file])["containerd.services.events.ttrpc.v1.Events"]
    problems = compare_service("containerd.task.v2.Task", task, up_task)
    problems += compare_service("containerd.services.events.ttrpc.v1.Events", events, up_events)
    assert not problems, "\n".join(problems)
    assert [m.name for m in events.method] == ["Forward"]


def test_google_rpc_status_matches_googleapis(tmp_path):
    mine = ours("google/rpc/status.proto")
    assert not explicit_problems(mine, {"google.rpc.Status": EXPLICIT["google.rpc.Status"]})
    if not (GOGO_GOOGLEAPIS / "google/rpc/status.proto").is_file():
        pytest.skip("golang-github-gogo-googleapis-dev is absent; checked against explicit numbers only")
    theirs = compile_upstream(tmp_path, "google/rpc/status.proto", [GOGO_GOOGLEAPIS])
    problems = compare_files(mine, theirs)
    assert not problems, "\n".join(problems)


# --- containerd.task.v3 ---------------------------------------------------------------------------


def test_task_v3_is_v2_under_another_package():
    v2, v3 = ours("containerd/task/v2/shim.proto"), ours("containerd/task/v3/shim.proto")
    assert v3.package == "containerd.task.v3"
    renamed = descriptor_pb2.FileDescriptorProto.FromString(
        v3.SerializeToString().replace(b".containerd.task.v3.", b".containerd.task.v2.")
    )
    assert list(v3.dependency) == list(v2.dependency)
    assert list(renamed.message_type) == list(v2.message_type)
    assert list(renamed.service) == list(v2.service)
    assert list(renamed.enum_type) == list(v2.enum_type)


# --- protos newer than containerd 1.6 ------------------------------------------------------------

# Debian ships containerd 1.6's sources only, so these are written down from upstream's .proto files:
# api/runtime/bootstrap/v1/bootstrap.proto @ v2.3.0 and api/types/introspection.proto @ v2.0.0 (unchanged
# since). Every field: (number, type, label, type name, proto3 optional).
_BOOT = ".containerd.runtime.bootstrap.v1."
NEWER = {
    "containerd/runtime/bootstrap/v1/bootstrap.proto": {
        "containerd.runtime.bootstrap.v1.BootstrapParams": {
            "instance_id": (1, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "namespace": (2, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "log_level": (3, FDP.TYPE_ENUM, FDP.LABEL_OPTIONAL, _BOOT + "LogLevel", False),
            "containerd_version": (4, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "containerd_ttrpc_address": (5, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "containerd_grpc_address": (6, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "containerd_binary": (7, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "extensions": (8, FDP.TYPE_MESSAGE, FDP.LABEL_REPEATED, _BOOT + "Extension", False),
            "socket_dir": (9, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", True),
        },
        "containerd.runtime.bootstrap.v1.Extension": {
            "value": (1, FDP.TYPE_MESSAGE, FDP.LABEL_OPTIONAL, ".google.protobuf.Any", False),
        },
        "containerd.runtime.bootstrap.v1.BootstrapResult": {
            "version": (1, FDP.TYPE_INT32, FDP.LABEL_OPTIONAL, "", False),
            "address": (2, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "protocol": (3, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "capabilities": (4, FDP.TYPE_ENUM, FDP.LABEL_REPEATED, _BOOT + "Capability", False),
            "metadata": (5, FDP.TYPE_MESSAGE, FDP.LABEL_REPEATED, _BOOT + "BootstrapResult.MetadataEntry", False),
        },
        "containerd.runtime.bootstrap.v1.LogLevel": {
            "LOG_LEVEL_INFO": 0, "LOG_LEVEL_TRACE": -8, "LOG_LEVEL_DEBUG": -4, "LOG_LEVEL_WARN": 4,
            "LOG_LEVEL_ERROR": 8, "LOG_LEVEL_FATAL": 10, "LOG_LEVEL_PANIC": 12,
        },
        "containerd.runtime.bootstrap.v1.Capability": {"CAPABILITY_UNSPECIFIED": 0},
    },
    "containerd/types/introspection.proto": {
        "containerd.types.RuntimeRequest": {
            "runtime_path": (1, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "options": (2, FDP.TYPE_MESSAGE, FDP.LABEL_OPTIONAL, ".google.protobuf.Any", False),
        },
        "containerd.types.RuntimeVersion": {
            "version": (1, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "revision": (2, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
        },
        "containerd.types.RuntimeInfo": {
            "name": (1, FDP.TYPE_STRING, FDP.LABEL_OPTIONAL, "", False),
            "version": (2, FDP.TYPE_MESSAGE, FDP.LABEL_OPTIONAL, ".containerd.types.RuntimeVersion", False),
            "options": (3, FDP.TYPE_MESSAGE, FDP.LABEL_OPTIONAL, ".google.protobuf.Any", False),
            "features": (4, FDP.TYPE_MESSAGE, FDP.LABEL_OPTIONAL, ".google.protobuf.Any", False),
            "annotations": (5, FDP.TYPE_MESSAGE, FDP.LABEL_REPEATED, ".containerd.types.RuntimeInfo.AnnotationsEntry",
                            False),
        },
    },
}
# The map fields above: message -> (entry name, its key and value types).
NEWER_MAPS = {
    "containerd.runtime.bootstrap.v1.BootstrapResult": ("MetadataEntry", FDP.TYPE_STRING, FDP.TYPE_STRING),
    "containerd.types.RuntimeInfo": ("AnnotationsEntry", FDP.TYPE_STRING, FDP.TYPE_STRING),
}


@pytest.mark.parametrize("proto", sorted(NEWER))
def test_newer_protos_match_upstream_numbers(proto):
    mine = ours(proto)
    assert mine.syntax == "proto3"
    types = top_level(mine)
    assert set(types) == set(NEWER[proto]), "types differ from upstream's"
    problems = []
    for full, expected in NEWER[proto].items():
        t = types[full]
        if isinstance(t, descriptor_pb2.EnumDescriptorProto):
            got = {v.name: v.number for v in t.value}
        else:
            got = {f.name: (*field_sig(f)[:4], f.proto3_optional) for f in t.field}
            entry = NEWER_MAPS.get(full)
            nested = {n.name: n for n in t.nested_type}
            assert set(nested) == ({entry[0]} if entry else set()), f"{full}: nested types {set(nested)}"
            if entry:
                e = nested[entry[0]]
                assert e.options.map_entry
                assert [(f.name, f.number, f.type) for f in e.field] == [("key", 1, entry[1]), ("value", 2, entry[2])]
        if got != expected:
            problems.append(f"{full}: ours {got} != upstream {expected}")
    assert not problems, "\n".join(problems)


# --- ttrpc ----------------------------------------------------------------------------------------

_GO_STRUCT = re.compile(r"^type (\w+) struct \{\n(.*?)^\}", re.MULTILINE | re.DOTALL)
_GO_FIELD = re.compile(r'^\s*\w+\s+(\S+)\s+`protobuf:"([^"]+)"`', re.MULTILINE)
_GO_TYPES = {
    "string": (FDP.TYPE_STRING, ""),
    "[]byte": (FDP.TYPE_BYTES, ""),
    "int64": (FDP.TYPE_INT64, ""),
    "*KeyValue": (FDP.TYPE_MESSAGE, ".ttrpc.KeyValue"),
    "*spb.Status": (FDP.TYPE_MESSAGE, ".google.rpc.Status"),
}


def go_struct_fields(source: str, struct: str) -> dict[str, tuple]:
    """Field signatures of a Go struct from its `protobuf:"wire,number,opt|rep,name=..."` tags."""
    (body,) = (m[2] for m in _GO_STRUCT.finditer(source) if m[1] == struct)
    fields = {}
    for go_type, tag in _GO_FIELD.findall(body):
        wire, number, label, name = tag.split(",")[:4]
        repeated = label == "rep"
        type_, type_name = _GO_TYPES[go_type.removeprefix("[]") if repeated else go_type]
        expected_wire = {FDP.TYPE_INT64: "varint"}.get(type_, "bytes")
        assert wire == expected_wire, f"{struct}.{name}: wire type {wire}"
        lab = FDP.LABEL_REPEATED if repeated else FDP.LABEL_OPTIONAL
        fields[name.removeprefix("name=")] = (int(number), type_, lab, type_name)
    return fields


def test_ttrpc_messages_match_explicit_numbers():
    problems = explicit_problems(
        ours("ttrpc/ttrpc.proto"), {k: v for k, v in EXPLICIT.items() if k.startswith("ttrpc.")}
    )
    assert not problems, "\n".join(problems)


def test_ttrpc_messages_match_types_go():
    if not TTRPC_TYPES_GO.is_file():
        pytest.skip(f"{TTRPC_TYPES_GO} is absent: install golang-github-containerd-ttrpc-dev")
    source = TTRPC_TYPES_GO.read_text()
    expected = {f"ttrpc.{s}": go_struct_fields(source, s) for s in ("Request", "Response", "KeyValue")}
    problems = explicit_problems(ours("ttrpc/ttrpc.proto"), expected)
    assert not problems, "\n".join(problems)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are sent as 10-byte two's complement varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _vfield(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _lfield(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def test_ttrpc_request_hand_encoded():
    from shim.api.ttrpc.ttrpc_pb2 import Request

    payload = _lfield(1, b"c1") + _lfield(2, b"/run/bundle")
    wire = (
        _lfield(1, b"containerd.task.v2.Task")
        + _lfield(2, b"Create")
        + _lfield(3, payload)
        + _vfield(4, -1_500_000_000)
        + _lfield(5, _lfield(1, b"containerd-namespace-ttrpc") + _lfield(2, b"k8s.io"))
        + _lfield(5, _lfield(1, b"traceparent") + _lfield(2, b"00-abc-def-01"))
    )
    req = Request.FromString(wire)
    assert req.service == "containerd.task.v2.Task"
    assert req.method == "Create"
    assert req.payload == payload
    assert req.timeout_nano == -1_500_000_000
    assert [(kv.key, kv.value) for kv in req.metadata] == [
        ("containerd-namespace-ttrpc", "k8s.io"),
        ("traceparent", "00-abc-def-01"),
    ]
    assert req.SerializeToString() == wire


def test_ttrpc_response_hand_encoded():
    from shim.api.ttrpc.ttrpc_pb2 import Response

    any_detail = _lfield(1, b"type.googleapis.com/x.Y") + _lfield(2, b"\x08\x01")
    status = _vfield(1, 5) + _lfield(2, b'container "x": not found') + _lfield(3, any_detail)
    error = Response.FromString(_lfield(1, status))
    assert error.HasField("status")
    assert (error.status.code, error.status.message) == (5, 'container "x": not found')
    assert error.status.details[0].type_url == "type.googleapis.com/x.Y"
    assert error.status.details[0].value == b"\x08\x01"
    assert error.SerializeToString() == _lfield(1, status)

    ok = Response.FromString(_lfield(2, b"\x08\x2a"))
    assert not ok.HasField("status") and ok.payload == b"\x08\x2a"
    empty = Response.FromString(b"")  # an OK reply whose message is all defaults
    assert not empty.HasField("status") and empty.payload == b""
    assert Response().SerializeToString() == b""
