"""A small CRI (runtime.v1) client over grpcio, for the CRI tests.

The messages are compiled from ``runtime_v1.proto`` at test time with grpc_tools.protoc into a temp
dir: grpcio-tools is already a test dependency, compiling takes a fraction of a second, and nothing
generated is committed (which would need its own staleness check, as shim/api has). Only the message
classes are generated; the RPC callables are built from the services in the compiled descriptor, so
a method name or type that does not match the .proto fails at once instead of at call time.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

PROTO = Path(__file__).with_name("runtime_v1.proto")
_api: ModuleType | None = None


def api() -> ModuleType:
    """The compiled runtime.v1 messages (compiled once per process: protobuf's descriptor pool is global
    and refuses a second definition of the same file)."""
    global _api
    if _api is None:
        from grpc_tools import protoc

        out = Path(tempfile.mkdtemp(prefix="pyrunc-cri-api-"))
        try:
            rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}", str(PROTO)])
            if rc != 0:
                raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
            spec = importlib.util.spec_from_file_location("cri_runtime_v1_pb2", out / "runtime_v1_pb2.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        finally:
            for f in out.iterdir():
                f.unlink()
            out.rmdir()
        _api = module
    return _api


class CRIClient:
    """``client.RunPodSandbox(pb.RunPodSandboxRequest(...))`` for every RPC in runtime_v1.proto.

    ``client.pb`` is the message module. Calls carry a deadline (a hung runtime must fail a test, not
    hang CI); ``timeout=`` overrides it per call.
    """

    def __init__(self, socket_path: str, timeout: float = 30) -> None:
        self.pb = api()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        for service in self.pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                stub = self.channel.unary_unary(
                    f"/{service.full_name}/{method.name}",
                    request_serializer=lambda msg: msg.SerializeToString(),
                    response_deserializer=getattr(self.pb, method.output_type.name).FromString,
                )
                setattr(self, method.name, self._with_deadline(stub, method.input_type.name))

    def _with_deadline(self, stub, request_type: str):
        def call(request: Any, timeout: float | None = None):
            if type(request).__name__ != request_type:
                raise TypeError(f"expected {request_type}, got {type(request).__name__}")
            return stub(request, timeout=self.timeout if timeout is None else timeout)

        return call

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
