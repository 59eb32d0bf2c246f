"""Our ttrpc client against the real peer: containerd's own ttrpc socket."""

from __future__ import annotations

import asyncio
import select
import subprocess
import time

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from shim.api.containerd.events import task_pb2 as events_pb2
from shim.api.containerd.services.ttrpc.events.v1 import events_pb2 as ttrpc_events_pb2
from shim.ttrpc import Client, Code, TTRPCError

EVENTS = "containerd.services.events.ttrpc.v1.Events"


def read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Collect a subprocess's stdout until ``needle`` shows up (or the time is out)."""
    out = ""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = proc.stdout.read1(65536).decode(errors="replace")
            if not chunk:
                break
            out += chunk
    return out


def test_forward_task_oom_reaches_containerd_subscribers(containerd):
    watcher = containerd.ctr_popen("events", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # let the subscription be in place before publishing

        async def publish() -> None:
            oom = events_pb2.TaskOOM(container_id="interop-oom-1")
            # containerd's typeurl registry wants the bare full name, no "/" or host prefix
            event = any_pb2.Any(type_url=oom.DESCRIPTOR.full_name, value=oom.SerializeToString())
            ts = timestamp_pb2.Timestamp()
            ts.GetCurrentTime()
            req = ttrpc_events_pb2.ForwardRequest(
                envelope=ttrpc_events_pb2.Envelope(
                    timestamp=ts, namespace=containerd.namespace, topic="/tasks/oom", event=event
                )
            )
            async with await Client.connect(
                containerd.ttrpc_address, metadata={"containerd-namespace-ttrpc": containerd.namespace}
            ) as client:
                reply = await client.call(EVENTS, "Forward", req, timeout=10)
                assert reply == b""  # google.protobuf.Empty: a zero-length body

        asyncio.run(publish())
        out = read_until(watcher, "interop-oom-1", timeout=10)
    finally:
        watcher.kill()
        watcher.wait()
    line = next(line for line in out.splitlines() if "interop-oom-1" in line)
    # ctr decoded the Any, so the type_url and payload are what containerd expects
    assert containerd.namespace in line and "/tasks/oom" in line and '"container_id":"interop-oom-1"' in line


def test_unknown_method_and_service_are_unimplemented_by_containerd(containerd):
    async def call(service: str, method: str) -> TTRPCError:
        async with await Client.connect(containerd.ttrpc_address) as client:
            with pytest.raises(TTRPCError) as e:
                await client.call(service, method, b"", timeout=10)
            return e.value

    err = asyncio.run(call(EVENTS, "NoSuchMethod"))
    assert err.code == Code.UNIMPLEMENTED
    err = asyncio.run(call("containerd.no.Such", "Forward"))
    assert err.code == Code.UNIMPLEMENTED


def test_bad_payload_is_an_error_and_connection_survives(containerd):
    async def main() -> None:
        async with await Client.connect(containerd.ttrpc_address) as client:
            with pytest.raises(TTRPCError) as e:
                await client.call(EVENTS, "Forward", b"\xff\xff\xff", timeout=10)
            assert e.value.code != Code.OK
            # the same connection still answers
            with pytest.raises(TTRPCError) as e:
                await client.call(EVENTS, "Nope", b"", timeout=10)
            assert e.value.code == Code.UNIMPLEMENTED

    asyncio.run(main())
