"""The publisher against a fake containerd on a real unix socket: order, retries, restarts, the bound."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyPB

from shim.api.containerd.events import task_pb2
from shim.api.containerd.services.ttrpc.events.v1 import events_pb2
from shim.events import EVENTS_SERVICE, TOPICS, Publisher
from shim.ttrpc import Code, Server, ServerContext, TTRPCError

NS = "k8s.io"


class FakeContainerd:
    """containerd's Events/Forward: records what it is sent; can fail calls, be slow, or be away."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[tuple[events_pb2.ForwardRequest, str | None]] = []
        self.fail_next = 0  # fail this many calls with fail_code
        self.fail_code = Code.UNAVAILABLE
        self.reject_topic: str | None = None  # always refuse envelopes with this topic
        self.delay = 0.0
        self.slow_next = 0  # make this many calls hang for slow_delay (past the client's timeout)
        self.slow_delay = 0.0
        self.calls = 0
        self._server: Server | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        server = Server()
        server.register(EVENTS_SERVICE, {"Forward": (self._forward, events_pb2.ForwardRequest)})
        await server.listen(self.path)
        self._server = server

    async def stop(self) -> None:
        assert self._server is not None
        await self._server.shutdown(timeout=1.0)
        self._server = None
        os.unlink(self.path)  # as a restarting containerd leaves it: gone, then created again

    async def _forward(self, ctx: ServerContext, req: events_pb2.ForwardRequest) -> bytes:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.slow_next:
            self.slow_next -= 1
            await asyncio.sleep(self.slow_delay)
        if self.fail_next:
            self.fail_next -= 1
            raise TTRPCError(self.fail_code, "injected failure")
        if req.envelope.topic == self.reject_topic:
            raise TTRPCError(Code.INVALID_ARGUMENT, "bad envelope")
        self.received.append((req, ctx.metadata.get_first("containerd-namespace-ttrpc")))
        self._changed.set()
        return b""  # google.protobuf.Empty

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self._changed.clear()
                await self._changed.wait()

    def topics(self) -> list[str]:
        return [r.envelope.topic for r, _ in self.received]


def event_of(envelope: events_pb2.Envelope) -> Any:
    """Decode the task event an envelope carries, by its (bare) type_url."""
    cls = getattr(task_pb2, envelope.event.type_url.rsplit(".", 1)[1])
    return cls.FromString(envelope.event.value)


@pytest.fixture
def sock_path() -> Iterator[str]:
    # Short on purpose: pytest's tmp_path can exceed the 108-byte limit of a unix socket path.
    with tempfile.TemporaryDirectory(prefix="ev", dir="/tmp") as d:
        yield os.path.join(d, "c.sock")


def make(path: str, **kw: object) -> Publisher:
    kw.setdefault("min_backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return Publisher(NS, path, "/run/containerd/containerd.sock", **kw)  # type: ignore[arg-type]


def numbered(n: int) -> list[task_pb2.TaskExecAdded]:
    """n distinguishable events: exec-added with ids e0, e1, ..."""
    return [task_pb2.TaskExecAdded(container_id="c", exec_id=f"e{i}") for i in range(n)]


def exec_ids(fake: FakeContainerd) -> list[str]:
    return [task_pb2.TaskExecAdded.FromString(r.envelope.event.value).exec_id for r, _ in fake.received]


def collapse(seq: list[str]) -> list[str]:
    """Drop back-to-back repeats: at-least-once delivery may resend the event that was in flight."""
    out: list[str] = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out


# -- envelopes ----------------------------------------------------------------------------------
def test_topics_cover_every_task_event() -> None:
    assert TOPICS["containerd.events.TaskExit"] == "/tasks/exit"
    assert TOPICS["containerd.events.TaskExecStarted"] == "/tasks/exec-started"
    assert TOPICS["containerd.events.TaskCheckpointed"] == "/tasks/checkpointed"
    assert len(TOPICS) == 10


def test_unknown_event_is_refused() -> None:
    pub = make("/nonexistent")
    with pytest.raises(ValueError):
        pub.publish(task_pb2.TaskIO(stdin="x"))
    assert pub.pending == 0


def test_order_topic_namespace_and_bare_type_url(sock_path: str) -> None:
    cid = "abc"
    events = [
        task_pb2.TaskCreate(container_id=cid, pid=7),
        task_pb2.TaskStart(container_id=cid, pid=7),
        task_pb2.TaskExecAdded(container_id=cid, exec_id="x"),
        task_pb2.TaskExecStarted(container_id=cid, exec_id="x", pid=8),
        task_pb2.TaskOOM(container_id=cid),
        task_pb2.TaskPaused(container_id=cid),
        task_pb2.TaskResumed(container_id=cid),
        task_pb2.TaskCheckpointed(container_id=cid, checkpoint="ck"),
        task_pb2.TaskExit(container_id=cid, id="x", pid=8, exit_status=3),
        task_pb2.TaskExit(container_id=cid, id=cid, pid=7, exit_status=137),
        task_pb2.TaskDelete(container_id=cid, id=cid, pid=7, exit_status=137),
    ]

    async def main() -> None:
        fake = FakeContainerd(sock_path)
        await fake.start()
        pub = make(sock_path)
        pub.start()
        for ev in events:
            pub.publish(ev)
        assert await pub.flush(5.0)
        await pub.close()
        await fake.stop()

        assert len(fake.received) == len(events)
        for ev, (req, md_ns) in zip(events, fake.received, strict=True):
            env = req.envelope
            name = ev.DESCRIPTOR.full_name
            assert env.topic == TOPICS[name]
            assert env.namespace == NS
            assert md_ns == NS
            assert env.event.type_url == name  # bare, e.g. "containerd.events.TaskExit"
            assert not env.event.type_url.startswith(("type.googleapis.com/", "/"))
            assert type(ev).FromString(env.event.value) == ev
            assert env.timestamp.seconds > 0
        assert pub.delivered == len(events)

    asyncio.run(main())


# -- containerd away, failing, restarting -------------------------------------------------------
def test_containerd_away_then_up_delivers_everything_in_order(sock_path: str) -> None:
    async def main() -> None:
        fake = FakeContainerd(sock_path)
        pub = make(sock_path)
        pub.start()
        events = numbered(20)
        for ev in events:
            pub.publish(ev)
        published_at = time.time()
        await asyncio.sleep(0.2)  # several failed connects while the socket does not exist
        assert fake.received == [] and pub.pending == 20
        assert not await pub.flush(0.05)

        await fake.start()
        assert await pub.flush(5.0)
        assert exec_ids(fake) == [e.exec_id for e in events]
        # Stamped when published, not when containerd finally got them.
        for req, _ in fake.received:
            assert req.envelope.timestamp.ToNanoseconds() / 1e9 <= published_at
        await pub.close()
        await fake.stop()

    asyncio.run(main())


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.INTERNAL, Code.DEADLINE_EXCEEDED])
def test_failed_calls_are_retried_in_order(sock_path: str, code: Code) -> None:
    async def main() -> None:
        fake = FakeContainerd(sock_path)
        fake.fail_next = 4
        fake.fail_code = code
        await fake.start()
        pub = make(sock_path)
        pub.start()
        events = numbered(10)
        for ev in events:
            pub.publish(ev)
        assert await pub.flush(5.0)
        assert exec_ids(fake) == [e.exec_id for e in events]
        assert fake.calls == 14
        await pub.close()
        await fake.stop()

    asyncio.run(main())


def test_call_timeout_reconnects_and_retries(sock_path: str) -> None:
    async def main() -> None:
        fake = FakeContainerd(sock_path)
        fake.slow_next = 1
        fake.slow_delay = 1.0
        await fake.start()
        pub = make(sock_path, call_timeout=0.1)
        pub.start()
        events = numbered(3)
        for ev in events:
            pub.publish(ev)
        assert await pub.flush(5.0)
        # The timed-out call was cancelled by the server at its deadline, so nothing is doubled here;
        # a containerd that applied it anyway would see e0 twice (at-least-once).
        assert exec_ids(fake) == ["e0", "e1", "e2"]
        assert fake.calls == 4
        await pub.close()
        await fake.stop()

    asyncio.run(main())


def test_restart_mid_stream_loses_nothing_and_keeps_order(sock_path: str) -> None:
    async def main() -> None:
        fake = FakeContainerd(sock_path)
        fake.delay = 0.005  # so that the stop lands while the stream is flowing
        await fake.start()
        pub = make(sock_path)
        pub.start()
        events = numbered(60)
        for ev in events[:40]:
            pub.publish(ev)
        for restart in range(2):
            await fake.wait_for(len(fake.received) + 8)
            await fake.stop()
            before = len(fake.received)
            assert before < 60
            for ev in events[40:50] if restart == 0 else events[50:]:
                pub.publish(ev)  # published while containerd is away
            await asyncio.sleep(0.1)
            assert len(fake.received) == before
            await fake.start()
        assert await pub.flush(5.0)
        got = exec_ids(fake)
        assert collapse(got) == [e.exec_id for e in events]
        assert len(got) - len(collapse(got)) <= 2  # at most the in-flight event, once per restart
        await pub.close()
        await fake.stop()

    asyncio.run(main())


def test_rejected_event_is_dropped_after_retries_and_does_not_block_the_rest(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        fake = FakeContainerd(sock_path)
        fake.reject_topic = "/tasks/oom"
        await fake.start()
        pub = make(sock_path, max_rejections=3)
        pub.start()
        pub.publish(task_pb2.TaskStart(container_id="c", pid=1))
        pub.publish(task_pb2.TaskOOM(container_id="c"))
        pub.publish(task_pb2.TaskExit(container_id="c", id="c", pid=1, exit_status=137))
        assert await pub.flush(5.0)
        assert fake.topics() == ["/tasks/start", "/tasks/exit"]
        assert fake.calls == 5  # start, oom x3, exit
        assert pub.dropped == 1
        await pub.close()
        await fake.stop()

    with caplog.at_level(logging.ERROR, logger="pyrunc.events"):
        asyncio.run(main())
    assert any("rejected /tasks/oom 3 times" in r.getMessage() for r in caplog.records)


# -- the bound ----------------------------------------------------------------------------------
def test_bound_drops_oldest_non_exit_first_and_keeps_exits(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        pub = make(sock_path, max_events=6)
        events = [
            task_pb2.TaskCreate(container_id="a"),  # dropped 1st
            task_pb2.TaskStart(container_id="a"),  # dropped 2nd
            task_pb2.TaskExit(container_id="a", id="a", exit_status=1),
            task_pb2.TaskCreate(container_id="b"),  # dropped 3rd
            task_pb2.TaskExit(container_id="b", id="b", exit_status=2),
            task_pb2.TaskDelete(container_id="a", id="a"),
            task_pb2.TaskStart(container_id="b"),
            task_pb2.TaskExit(container_id="c", id="c", exit_status=3),
            task_pb2.TaskDelete(container_id="b", id="b"),
        ]
        for ev in events:
            pub.publish(ev)
        assert pub.pending == 6
        assert pub.dropped == 3
        survivors = [(e.topic, event_of(e).container_id) for e in pub.pending_envelopes()]
        expected = [
            ("/tasks/exit", "a"),
            ("/tasks/exit", "b"),
            ("/tasks/delete", "a"),
            ("/tasks/start", "b"),
            ("/tasks/exit", "c"),
            ("/tasks/delete", "b"),
        ]
        assert survivors == expected

        # Only exits left: then the oldest exits go.
        for i in range(4):
            pub.publish(task_pb2.TaskExit(container_id=f"x{i}", id=f"x{i}"))
        survivors = [(e.topic, event_of(e).container_id) for e in pub.pending_envelopes()]
        assert survivors == [
            ("/tasks/exit", "b"),
            ("/tasks/exit", "c"),
            ("/tasks/exit", "x0"),
            ("/tasks/exit", "x1"),
            ("/tasks/exit", "x2"),
            ("/tasks/exit", "x3"),
        ]
        assert pub.dropped == 7

        # What survived is delivered in publish order.
        fake = FakeContainerd(sock_path)
        await fake.start()
        pub.start()
        assert await pub.flush(5.0)
        assert [(r.envelope.topic, event_of(r.envelope).container_id) for r, _ in fake.received] == survivors
        await pub.close()
        await fake.stop()

    with caplog.at_level(logging.WARNING, logger="pyrunc.events"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if "outbox over 6 events" in r.getMessage()]
    assert len(warnings) == 7  # once per publish that went over
    assert "dropped 1 oldest non-exit events {'/tasks/create': 1} and 0 exit events" in warnings[0]
    assert "dropped 0 oldest non-exit events {} and 1 exit events (7 dropped in total)" in warnings[-1]


def test_bound_never_drops_the_event_in_flight(sock_path: str) -> None:
    async def main() -> None:
        fake = FakeContainerd(sock_path)
        fake.delay = 0.2
        await fake.start()
        pub = make(sock_path, max_events=2)
        pub.start()
        events = numbered(6)
        pub.publish(events[0])
        await asyncio.sleep(0.05)  # e0 is now in flight
        for ev in events[1:]:
            pub.publish(ev)
        assert [task_pb2.TaskExecAdded.FromString(e.event.value).exec_id for e in pub.pending_envelopes()] == [
            "e0",
            "e4",
            "e5",
        ]
        assert await pub.flush(5.0)
        assert exec_ids(fake) == ["e0", "e4", "e5"]
        await pub.close()
        await fake.stop()

    asyncio.run(main())


# -- flush and close ----------------------------------------------------------------------------
def test_flush_waits_for_delivery_and_times_out(sock_path: str) -> None:
    async def main() -> None:
        fake = FakeContainerd(sock_path)
        fake.delay = 0.1
        await fake.start()
        pub = make(sock_path)
        assert await pub.flush(0.01)  # nothing published: already empty
        pub.start()
        pub.publish(task_pb2.TaskExit(container_id="c", id="c"))
        pub.publish(task_pb2.TaskDelete(container_id="c", id="c"))
        assert not await pub.flush(0.05)  # still in flight
        t0 = time.monotonic()
        assert await pub.flush(5.0)
        assert time.monotonic() - t0 < 1.0
        assert fake.topics() == ["/tasks/exit", "/tasks/delete"]
        assert pub.pending == 0
        await pub.close()
        with pytest.raises(RuntimeError):
            pub.start()
        await fake.stop()

    asyncio.run(main())


def test_close_while_containerd_is_away_returns_promptly(sock_path: str) -> None:
    async def main() -> None:
        pub = make(sock_path, max_backoff=10.0)
        pub.start()
        pub.publish(task_pb2.TaskExit(container_id="c", id="c"))
        assert not await pub.flush(0.3)
        async with asyncio.timeout(1.0):
            await pub.close()
        assert pub.pending == 1

    asyncio.run(main())


# -- the legacy path ----------------------------------------------------------------------------
class FakeSpawn:
    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[tuple[list[str], bytes]] = []
        self.fail_first = fail_first
        self.running = 0
        self.max_running = 0

    async def __call__(self, argv: list[str], stdin_data: bytes) -> int:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(0.005)
            self.calls.append((argv, stdin_data))
            if self.fail_first:
                self.fail_first -= 1
                return 1
            return 0
        finally:
            self.running -= 1


def test_legacy_path_spawns_publish_binary_in_order(caplog: pytest.LogCaptureFixture) -> None:
    events = [
        task_pb2.TaskCreate(container_id="c", pid=1),
        task_pb2.TaskStart(container_id="c", pid=1),
        task_pb2.TaskExit(container_id="c", id="c", pid=1, exit_status=0),
        task_pb2.TaskDelete(container_id="c", id="c", pid=1),
    ]
    spawn = FakeSpawn(fail_first=2)

    async def main() -> None:
        pub = Publisher(
            NS,
            "",
            "/run/containerd/containerd.sock",
            "/usr/bin/containerd",
            spawn,
            min_backoff=0.01,
            max_backoff=0.05,
        )
        pub.start()
        for ev in events:
            pub.publish(ev)
        assert await pub.flush(5.0)
        await pub.close()

    with caplog.at_level(logging.WARNING, logger="pyrunc.events"):
        asyncio.run(main())

    assert spawn.max_running == 1
    assert len(spawn.calls) == len(events) + 2
    # The first event failed twice, then went through; the order never changed.
    delivered = spawn.calls[2:]
    assert [argv for argv, _ in spawn.calls[:3]] == [spawn.calls[0][0]] * 3
    for ev, (argv, stdin) in zip(events, delivered, strict=True):
        name = ev.DESCRIPTOR.full_name
        assert argv == [
            "/usr/bin/containerd",
            "--address",
            "/run/containerd/containerd.sock",
            "publish",
            "--topic",
            TOPICS[name],
            "--namespace",
            NS,
        ]
        expected = AnyPB(type_url=name, value=ev.SerializeToString()).SerializeToString()
        assert stdin == expected
    assert any("exited with status 1" in r.getMessage() for r in caplog.records)


def test_needs_a_way_to_publish() -> None:
    with pytest.raises(ValueError):
        Publisher(NS, None, "/run/containerd/containerd.sock", None, None)
    with pytest.raises(ValueError):
        Publisher(NS, "", "/run/containerd/containerd.sock", "/usr/bin/containerd", None)
