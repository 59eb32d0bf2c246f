"""``start`` across containerd generations: what it reads on stdin, what it prints, and whether the caller
can read that back — no containerd needed.

Messages are built with the classes generated from protos/containerd/runtime/bootstrap/v1 (numbers as in
containerd 2.3's api/runtime/bootstrap/v1/bootstrap.proto; test_api_compat checks them) and compared
with shim.cli's hand-made decoder and encoders.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim import cli, options
from shim.api.containerd.runc.v1 import options_pb2
from shim.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2 as boot
from shim.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2

CONTAINERD_SOCK = "/run/containerd/containerd.sock"
TTRPC_SOCK = CONTAINERD_SOCK + ".ttrpc"
NS, CID = "k8s.io", "c1"

RUNC_OPTIONS = options_pb2.Options(binary_name="crun", root="/run/x", shim_cgroup="/pods")
RUNC_ANY = any_pb2.Any(type_url="containerd.runc.v1.Options", value=RUNC_OPTIONS.SerializeToString())
CONFIG_ANY = any_pb2.Any(type_url="runtimeoptions.v1.Options",
                         value=runtimeoptions_pb2.Options(config_path="/etc/pyrunc.toml").SerializeToString())


def params(**fields: object) -> boot.BootstrapParams:
    """A BootstrapParams as containerd 2.3's pkg/shim.Command fills it, with ``fields`` changed."""
    values: dict[str, object] = dict(
        instance_id=CID, namespace=NS, log_level=boot.LOG_LEVEL_INFO, containerd_version="v2.3.0",
        containerd_ttrpc_address=TTRPC_SOCK, containerd_grpc_address=CONTAINERD_SOCK,
        containerd_binary="/usr/bin/containerd", extensions=[boot.Extension(value=RUNC_ANY)])
    values.update(fields)
    return boot.BootstrapParams(**values)  # type: ignore[arg-type]


def test_option_types_are_shim_options() -> None:
    assert cli.OPTIONS_TYPES == (options.RUNC_OPTIONS, options.RUNTIME_OPTIONS)


# -- the decision ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("bootstrap", "max_version", "answer"), [
    (False, None, ("plain", 0)),  # containerd 1.6
    (False, "", ("plain", 0)),
    (False, "1", ("plain", 0)),
    (False, "two", ("plain", 0)),  # not a promise of anything
    (False, "2", ("json", 2)),  # 1.7, and 2.0-2.2 which look the same
    (False, " 2\n", ("json", 2)),
    (False, "3", ("json", 3)),
    (False, "9", ("json", 3)),  # never above what we serve
    (True, None, ("protobuf", 3)),  # 2.3+: BootstrapParams on stdin
    (True, "2", ("protobuf", 3)),
])
def test_answer_form(bootstrap: bool, max_version: str | None, answer: tuple[str, int]) -> None:
    assert cli.answer_form(bootstrap, max_version) == answer


def test_encoders_match_upstream_shapes() -> None:
    address = "unix:///run/containerd/s/" + "ab" * 32
    assert cli.encode_answer("plain", 0, address) == address.encode()
    text = cli.encode_answer("json", 2, address)
    assert text == b'{"version":2,"address":"' + address.encode() + b'","protocol":"ttrpc"}'  # Go's json.Marshal
    assert list(json.loads(text).items()) == [("version", 2), ("address", address), ("protocol", "ttrpc")]
    wire = cli.encode_answer("protobuf", 3, address)
    assert wire == boot.BootstrapResult(version=3, address=address, protocol="ttrpc").SerializeToString()


@pytest.mark.parametrize("address", ["unix:///tmp/a b/\"q\"\\/\u00e9\u2028", "unix:///x\x01\x1f"])
def test_json_answer_escapes(address: str) -> None:
    assert json.loads(cli.encode_bootstrap_json(3, address, "ttrpc")) == \
        {"version": 3, "address": address, "protocol": "ttrpc"}


@pytest.mark.parametrize(("version", "address", "protocol"), [
    (0, "", ""), (2, "unix:///s/x", "ttrpc"), (3, "a" * 300, "grpc"), (-1, "\u00e9", "ttrpc")])
def test_bootstrap_result_matches_protobuf(version: int, address: str, protocol: str) -> None:
    expected = boot.BootstrapResult(version=version, address=address, protocol=protocol).SerializeToString()
    assert cli.encode_bootstrap_result(version, address, protocol) == expected


# -- reading stdin --------------------------------------------------------------------------------

def test_decodes_what_containerd_2_3_sends() -> None:
    msg = params(log_level=boot.LOG_LEVEL_DEBUG, socket_dir="/run/k3s/containerd/s")
    p = cli.decode_bootstrap_params(msg.SerializeToString())
    assert (p.instance_id, p.namespace, p.log_level, p.containerd_version) == (CID, NS, -4, "v2.3.0")
    assert (p.ttrpc_address, p.grpc_address, p.binary) == (TTRPC_SOCK, CONTAINERD_SOCK, "/usr/bin/containerd")
    assert p.socket_dir == "/run/k3s/containerd/s"
    assert p.options == RUNC_ANY.SerializeToString()  # the Any itself, as the server wants it
    assert cli.bootstrap_params(msg.SerializeToString(), CID, NS) is not None


def test_socket_dir_presence() -> None:
    assert cli.decode_bootstrap_params(params().SerializeToString()).socket_dir is None
    assert cli.decode_bootstrap_params(params(socket_dir="").SerializeToString()).socket_dir == ""


@pytest.mark.parametrize(("extensions", "expected"), [
    ([], b""),
    ([boot.Extension()], b""),  # an extension without a value
    ([boot.Extension(value=CONFIG_ANY)], CONFIG_ANY.SerializeToString()),
    # a future extension that is not runtime options comes first: skipped, not taken for options
    ([boot.Extension(value=any_pb2.Any(type_url="containerd.io/cri.v1.PodSandboxConfig", value=b"\n\x01x")),
      boot.Extension(value=RUNC_ANY), boot.Extension(value=CONFIG_ANY)], RUNC_ANY.SerializeToString()),
    ([boot.Extension(value=any_pb2.Any(type_url="type.googleapis.com/containerd.runc.v1.Options", value=b"2\x01x"))],
     any_pb2.Any(type_url="type.googleapis.com/containerd.runc.v1.Options", value=b"2\x01x").SerializeToString()),
])
def test_options_extension(extensions: list[boot.Extension], expected: bytes) -> None:
    assert cli.decode_bootstrap_params(params(extensions=extensions).SerializeToString()).options == expected


def test_a_repeated_extension_value_merges_as_protobuf_merges() -> None:
    first = boot.Extension(value=any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"2\x01a"))
    second = boot.Extension(value=any_pb2.Any(value=b"2\x01b"))
    # One Extension whose field 1 occurs twice: protobuf merges the two Anys.
    data = params(extensions=[]).SerializeToString() + b"\x42" + bytes(
        [len(first.SerializeToString() + second.SerializeToString())]) + first.SerializeToString() \
        + second.SerializeToString()
    merged = boot.BootstrapParams.FromString(data).extensions[0].value
    assert any_pb2.Any.FromString(cli.decode_bootstrap_params(data).options) == merged
    assert (merged.type_url, merged.value) == ("containerd.runc.v1.Options", b"2\x01b")


@pytest.mark.parametrize(("level", "debug"), [
    (boot.LOG_LEVEL_TRACE, True), (boot.LOG_LEVEL_DEBUG, True), (-5, True), (-3, False),
    (boot.LOG_LEVEL_INFO, False), (boot.LOG_LEVEL_WARN, False), (boot.LOG_LEVEL_PANIC, False), (-(2**31), True),
])
def test_log_level_means_debug(level: int, debug: bool, tmp_path: Path) -> None:
    p = cli.decode_bootstrap_params(params(log_level=level).SerializeToString())
    assert p.log_level == level
    args = cli.ShimArgs(namespace=NS, id=CID, bundle=str(tmp_path), ttrpc_address="", grpc_address="")
    p.apply(args)
    assert args.debug is debug


def test_apply_prefers_what_bootstrap_says(tmp_path: Path) -> None:
    args = cli.ShimArgs(namespace=NS, id=CID, address="/flag.sock", publish_binary="containerd", bundle=str(tmp_path),
                        ttrpc_address="/env.ttrpc", grpc_address="/env.sock", debug=True)
    cli.decode_bootstrap_params(params().SerializeToString()).apply(args)
    assert (args.ttrpc_address, args.grpc_address, args.publish_binary) == \
        (TTRPC_SOCK, CONTAINERD_SOCK, "/usr/bin/containerd")
    assert args.address == "/flag.sock"  # the socket's name keeps the flag's hash
    assert args.debug  # -debug stays on whatever the log level
    empty = cli.ShimArgs(namespace=NS, id=CID, bundle=str(tmp_path), ttrpc_address="/env.ttrpc", grpc_address="")
    cli.decode_bootstrap_params(params(containerd_ttrpc_address="", containerd_binary="").SerializeToString()
                                ).apply(empty)
    assert (empty.ttrpc_address, empty.address, empty.publish_binary) == ("/env.ttrpc", CONTAINERD_SOCK, "containerd")


@pytest.mark.parametrize("legacy", [RUNC_ANY, CONFIG_ANY, any_pb2.Any(type_url="x", value=b"")])
def test_a_legacy_any_is_not_taken_for_bootstrap_params(legacy: any_pb2.Any) -> None:
    """The reason for compat.go's identity check: the Any parses as a BootstrapParams too."""
    data = legacy.SerializeToString()
    as_params = boot.BootstrapParams.FromString(data)
    assert as_params.instance_id == legacy.type_url
    decoded = cli.decode_bootstrap_params(data)
    assert (decoded.instance_id, decoded.namespace) == (as_params.instance_id, as_params.namespace)
    assert cli.bootstrap_params(data, CID, NS) is None
    # only an Any whose type and value happen to equal -id and -namespace would pass
    assert cli.bootstrap_params(data, legacy.type_url, legacy.value.decode()) is not None


def test_identity_must_match() -> None:
    data = params().SerializeToString()
    assert cli.bootstrap_params(data, CID, NS) is not None
    assert cli.bootstrap_params(data, "other", NS) is None
    assert cli.bootstrap_params(data, CID, "default") is None
    assert cli.bootstrap_params(b"", CID, NS) is None


# Malformed messages, each also refused by protobuf itself.
MALFORMED = [
    b"\x0a\x05c1",  # length beyond the end
    b"\x0a",  # truncated length
    b"\x80",  # truncated tag
    b"\x0f",  # wire type 7
    b"\x0e\x00",  # wire type 6
    b"\x00\x00",  # field number 0
    b"\x0c",  # an end-group with no group
    b"\x0b\x0a\x00",  # a group never ended
    b"\x0b\x14",  # a group ended by another number
    b"\x0a\x02\xff\xfe",  # instance_id not UTF-8
    b"\x42\x04\x0a\x02\x0a\xff",  # an extension's Any with a type_url not UTF-8 (parsed eagerly)
    b"\x42\x02\x0a\x05",  # an extension cut short
    b"\x18" + b"\xff" * 10 + b"\x01",  # a varint longer than 10 bytes
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_is_refused_as_protobuf_refuses_it(data: bytes) -> None:
    with pytest.raises(DecodeError):
        boot.BootstrapParams.FromString(data)
    with pytest.raises(ValueError):
        cli.decode_bootstrap_params(data)
    assert cli.bootstrap_params(data, CID, NS) is None  # then it is the legacy form, handed on as is


def test_unknown_fields_and_wrong_wire_types_are_skipped() -> None:
    base = params(socket_dir="/s").SerializeToString()
    extra = (b"\xa0\x06\x07"  # field 100 varint
             + b"\xa5\x06\x01\x02\x03\x04"  # field 100 fixed32
             + b"\xa1\x06" + bytes(8)  # field 100 fixed64
             + b"\xa3\x06\x08\x01\x0b\x0c\xa4\x06"  # field 100 group holding a varint and an empty group
             + b"\x08\x05"  # instance_id (1) as a varint: not the declared type, kept as unknown
             + b"\x1a\x01x")  # log_level (3) length-delimited: likewise
    data = base + extra
    theirs = boot.BootstrapParams.FromString(data)
    ours = cli.decode_bootstrap_params(data)
    assert (ours.instance_id, ours.log_level, ours.socket_dir) == (theirs.instance_id, theirs.log_level, "/s")
    assert ours.options == theirs.extensions[0].value.SerializeToString()


def test_the_last_of_a_repeated_singular_field_wins() -> None:
    data = params().SerializeToString() + b"\x0a\x02c2" + b"\x18\x08"
    theirs = boot.BootstrapParams.FromString(data)
    ours = cli.decode_bootstrap_params(data)
    assert (ours.instance_id, ours.log_level) == (theirs.instance_id, theirs.log_level) == ("c2", 8)


_text = st.text(max_size=40)
_any = st.builds(any_pb2.Any, type_url=st.sampled_from(["", "containerd.runc.v1.Options", "runtimeoptions.v1.Options",
                                                         "types.googleapis.com/containerd.runc.v1.Options",
                                                         "containerd.io/cri.v1.X"]),
                 value=st.binary(max_size=20))
_extension = st.one_of(st.builds(boot.Extension), st.builds(boot.Extension, value=_any))
_params = st.builds(
    boot.BootstrapParams, instance_id=_text, namespace=_text, log_level=st.integers(-(2**31), 2**31 - 1),
    containerd_version=_text, containerd_ttrpc_address=_text, containerd_grpc_address=_text,
    containerd_binary=_text, extensions=st.lists(_extension, max_size=4),
    socket_dir=st.one_of(st.none(), _text))


def fields_of(msg: boot.BootstrapParams) -> tuple[object, ...]:
    options = next((e.value for e in msg.extensions if e.value.type_url.rpartition("/")[2] in cli.OPTIONS_TYPES),
                   any_pb2.Any())
    return (msg.instance_id, msg.namespace, msg.log_level, msg.containerd_version, msg.containerd_ttrpc_address,
            msg.containerd_grpc_address, msg.containerd_binary,
            msg.socket_dir if msg.HasField("socket_dir") else None, options)


def decoded(data: bytes) -> tuple[object, ...]:
    p = cli.decode_bootstrap_params(data)
    return (p.instance_id, p.namespace, p.log_level, p.containerd_version, p.ttrpc_address, p.grpc_address,
            p.binary, p.socket_dir, any_pb2.Any.FromString(p.options))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_params)
def test_decoder_reads_what_protobuf_writes(msg: boot.BootstrapParams) -> None:
    data = msg.SerializeToString()
    assert decoded(data) == fields_of(boot.BootstrapParams.FromString(data))


@settings(max_examples=500, deadline=None)
@given(_params, st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=3))
def test_decoder_agrees_with_protobuf_on_corrupted_bytes(msg: boot.BootstrapParams,
                                                         edits: list[tuple[int, int]]) -> None:
    data = bytearray(msg.SerializeToString())
    for where, byte in edits:
        if data:
            data[where % len(data)] = byte
    try:
        theirs = fields_of(boot.BootstrapParams.FromString(bytes(data)))
    except DecodeError:
        with pytest.raises(ValueError):
            cli.decode_bootstrap_params(bytes(data))
        return
    assert decoded(bytes(data)) == theirs


# -- start, end to end in this process ------------------------------------------------------------

def parse_start_response(generation: str, out: bytes) -> tuple[int, str, str]:
    """(version, address, protocol) as each containerd reads start's stdout — a model of its Go code:
    1.6 runtime/v2/binary.go; 1.7 runtime/v2/shim.go and 2.0-2.2 core/runtime/v2/shim.go
    ``parseStartResponse``; 2.3 the same, trying a marshalled BootstrapResult first. Raises on refusal."""
    response = out.strip()
    if generation == "2.3":
        try:
            result = boot.BootstrapResult.FromString(out)
            return result.version, result.address, result.protocol
        except DecodeError:
            pass
    if generation == "1.6":
        return 2, response.decode(), "ttrpc"
    try:
        params = json.loads(response)
        version, address, protocol = params.get("version", 0), params.get("address", ""), params.get("protocol", "")
    except (ValueError, AttributeError):
        version = 0
    if version < 2:
        version, address, protocol = 2, response.decode(), "ttrpc"
    newest = 2 if generation == "1.7" else 3
    if version > newest:
        raise ValueError(f"unsupported shim version ({version})")
    return version, address, protocol


# What each containerd puts in start's environment and stdin (pkg/shim/util.go Command, per release).
GENERATIONS = {
    "1.6": ({}, RUNC_ANY.SerializeToString()),
    "1.7": ({"MAX_SHIM_VERSION": "2", "GRPC_ADDRESS": CONTAINERD_SOCK, "NAMESPACE": NS},
            RUNC_ANY.SerializeToString()),
    "2.0": ({"MAX_SHIM_VERSION": "2", "GRPC_ADDRESS": CONTAINERD_SOCK, "NAMESPACE": NS},
            RUNC_ANY.SerializeToString()),
    "2.3": ({"MAX_SHIM_VERSION": "2", "GRPC_ADDRESS": CONTAINERD_SOCK, "NAMESPACE": NS},
            params().SerializeToString()),
}


@pytest.fixture
def sockdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="pyrunc-", dir="/tmp")
    monkeypatch.setattr(cli, "SOCKET_DIR", os.path.join(base, "s"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text('{"ociVersion": "1.0.2"}')
    return tmp_path


class Started:
    """start run in this process with the fork faked: what it printed and what the server got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.served: list[tuple[cli.ShimArgs, str, bytes]] = []
        monkeypatch.setattr(os, "fork", lambda: 0)  # "the child": _become_server, faked, returns

        def become_server(args: cli.ShimArgs, listener: object, options: bytes) -> None:
            self.served.append((args, args.socket_path, options))

        monkeypatch.setattr(cli, "_become_server", become_server)
        monkeypatch.setattr(cli, "_adjust_oom_score", lambda pid: None)
        self.monkeypatch = monkeypatch

    def run(self, bundle: Path, env: dict[str, str], stdin: bytes, capsysbinary: pytest.CaptureFixture[bytes],
            cid: str = CID) -> bytes:
        for name in ("MAX_SHIM_VERSION", "GRPC_ADDRESS", "NAMESPACE"):
            self.monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            self.monkeypatch.setenv(name, value)
        self.monkeypatch.setenv("TTRPC_ADDRESS", TTRPC_SOCK)
        self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        argv = ["-namespace", NS, "-address", CONTAINERD_SOCK, "-publish-binary", "/usr/bin/containerd",
                "-id", cid, "-bundle", str(bundle), "start"]
        assert cli.main(argv) == 0
        out, err = capsysbinary.readouterr()
        assert err == b""
        return out


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Started:
    return Started(monkeypatch)


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_each_containerd_reads_the_answer(generation: str, started: Started, sockdir: str, bundle: Path,
                                          capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    env, stdin = GENERATIONS[generation]
    out = started.run(bundle, env, stdin, capsysbinary)
    address = cli.socket_address(CONTAINERD_SOCK, NS, CID)
    expected = {"1.6": 2, "1.7": 2, "2.0": 2, "2.3": 3}[generation]
    assert parse_start_response(generation, out) == (expected, address, "ttrpc")
    if generation == "1.6":
        assert out == address.encode()  # exactly as before bootstrap forms existed
    ((args, path, options),) = started.served
    assert path == address.removeprefix("unix://")
    assert options == RUNC_ANY.SerializeToString()  # the options Any, whatever the stdin form
    assert (args.ttrpc_address, args.address, args.publish_binary) == \
        (TTRPC_SOCK, CONTAINERD_SOCK, "/usr/bin/containerd")
    assert (bundle / "address").read_text() == address
    # Every later containerd reads this answer too (one restarted after an upgrade meets older shims).
    for newer in (g for g in GENERATIONS if g >= generation):
        assert parse_start_response(newer, out)[1] == address


@pytest.mark.parametrize(("max_version", "version"), [("3", 3), ("4", 3)])
def test_a_caller_promising_version_3_gets_it(max_version: str, version: int, started: Started, sockdir: str,
                                              bundle: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    out = started.run(bundle, {"MAX_SHIM_VERSION": max_version}, b"", capsysbinary)
    assert json.loads(out) == {"version": version, "address": cli.socket_address(CONTAINERD_SOCK, NS, CID),
                               "protocol": "ttrpc"}
    assert started.served[0][2] == b""


def test_bootstrap_params_for_another_container_are_legacy_bytes(started: Started, sockdir: str, bundle: Path,
                                                                 capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    data = params(instance_id="someone-else").SerializeToString()
    out = started.run(bundle, {"MAX_SHIM_VERSION": "2"}, data, capsysbinary)
    assert json.loads(out)["version"] == 2
    assert started.served[0][2] == data  # handed on untouched; the server reports them as bad options


def test_socket_dir_is_honoured(started: Started, sockdir: str, bundle: Path,
                                capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    socket_dir = os.path.join(sockdir, "state", "s")
    out = started.run(bundle, {}, params(socket_dir=socket_dir).SerializeToString(), capsysbinary)
    address = cli.socket_address(CONTAINERD_SOCK, NS, CID, socket_dir=socket_dir)
    assert boot.BootstrapResult.FromString(out).address == address
    path = address.removeprefix("unix://")
    assert os.path.exists(path) and started.served[0][1] == path
    assert oct(os.stat(socket_dir).st_mode & 0o777) == oct(0o700)
    assert not os.path.exists(cli.SOCKET_DIR)  # the default dir is not touched


def test_an_empty_socket_dir_means_the_default(started: Started, sockdir: str, bundle: Path,
                                               capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    out = started.run(bundle, {}, params(socket_dir="").SerializeToString(), capsysbinary)
    assert boot.BootstrapResult.FromString(out).address == cli.socket_address(CONTAINERD_SOCK, NS, CID)


@pytest.mark.parametrize(("socket_dir", "message"), [
    ("relative/s", "not an absolute path"),
    ("/tmp/" + "d" * 60, "longer than 107 bytes"),
])
def test_a_bad_socket_dir_fails_start(socket_dir: str, message: str, started: Started, sockdir: str, bundle: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(params(socket_dir=socket_dir).SerializeToString())))
    argv = ["-namespace", NS, "-address", CONTAINERD_SOCK, "-id", CID, "-bundle", str(bundle), "start"]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and message in err and not started.served


def test_a_live_group_socket_is_answered_in_the_callers_form(started: Started, sockdir: str, bundle: Path,
                                                              capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """Another container of a served pod: no new server, the same address, in the form its caller reads."""
    (bundle / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}')
    address = cli.socket_address(CONTAINERD_SOCK, NS, "pod1")
    path = address.removeprefix("unix://")
    os.makedirs(os.path.dirname(path), mode=0o700)
    with socket.socket(socket.AF_UNIX) as live:  # the pod's server
        live.bind(path)
        live.listen()
        env = GENERATIONS["2.3"][0]
        out = started.run(bundle, env, params(instance_id="c2").SerializeToString(), capsysbinary, cid="c2")
        assert out == boot.BootstrapResult(version=3, address=address, protocol="ttrpc").SerializeToString()
        out = started.run(bundle, GENERATIONS["1.7"][0], b"", capsysbinary, cid="c3")
        assert json.loads(out) == {"version": 2, "address": address, "protocol": "ttrpc"}
        assert started.run(bundle, {}, b"", capsysbinary, cid="c4") == address.encode()
    assert started.served == []


LIGHT_START = """
import os, sys
before = set(sys.modules)
import shim.cli as cli
cli.SOCKET_DIR = sys.argv[1]
os.fork = lambda: 2**22 + 1  # the parent's side only, of a child that does not exist
cli._adjust_oom_score = lambda pid: None
status = cli.main(sys.argv[2:])
new = set(sys.modules) - before
heavy = ("asyncio", "google.protobuf", "json", "subprocess", "hashlib", "dataclasses", "socket", "logging", "typing",
         "re", "shim.serve", "shim.options", "shim.info")
sys.stderr.write(" ".join(m for m in heavy if m in new))
sys.exit(status)
"""


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_start_stays_light_with_every_stdin_form(generation: str, sockdir: str, bundle: Path) -> None:
    """start reads BootstrapParams and answers in every form without loading protobuf or json."""
    env, stdin = GENERATIONS[generation]
    argv = [sys.executable, "-c", LIGHT_START, os.path.join(sockdir, "s"), "-namespace", NS, "-address",
            CONTAINERD_SOCK, "-id", CID, "-bundle", str(bundle), "start"]
    full_env = {k: v for k, v in os.environ.items() if k != "MAX_SHIM_VERSION"}
    full_env.update(env, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run(argv, env=full_env, input=stdin, capture_output=True, timeout=30)
    assert (r.returncode, r.stderr) == (0, b""), r
    assert parse_start_response(generation, r.stdout)[1] == \
        cli.socket_address(CONTAINERD_SOCK, NS, CID, socket_dir=os.path.join(sockdir, "s"))
