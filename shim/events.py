"""The one publisher of a shim process: task events to containerd, in the order they happened.

The task service calls :meth:`Publisher.publish` at the moment a state change happens, with no ``await``
in between, so the order of the outbox *is* the order of events (create → start → exit → delete, an
exec's exit before its init's exit). A single background task forwards the outbox head first and
removes an event only once containerd acknowledged it, so a failure never reorders anything.

Delivery is **at-least-once**. A Forward call that timed out, or whose connection dropped while it was
in flight, may or may not have been applied by containerd; we cannot tell, so we send the same envelope
again. containerd may therefore see an event twice (always back to back, since the head is retried
before anything behind it), but it never silently misses one -- a lost /tasks/exit leaves a container
"running" forever, while a repeated one is harmless to containerd's exit handling. The Go shim's
publisher (pkg/shim/publisher.go) is at-least-once too: it resends after any error, including a 5 s
timeout, but it requeues failed events behind newer ones (reordering them) and drops an event after 5
retries. We keep order and retry transient failures for as long as it takes; containerd restarting is
normal and the outbox simply waits for it.

Memory is bounded by ``max_events``; see :class:`Publisher` for what gets dropped when it is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.any_pb2 import Any as AnyPB
from google.protobuf.message import Message

from shim.api.containerd.events import task_pb2
from shim.api.containerd.services.ttrpc.events.v1 import events_pb2
from shim.ttrpc import Client, ClosedError, Code, TTRPCError

log = logging.getLogger("pyrunc.events")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"

TOPICS: dict[str, str] = {
    task_pb2.TaskCreate.DESCRIPTOR.full_name: "/tasks/create",
    task_pb2.TaskStart.DESCRIPTOR.full_name: "/tasks/start",
    task_pb2.TaskExit.DESCRIPTOR.full_name: "/tasks/exit",
    task_pb2.TaskDelete.DESCRIPTOR.full_name: "/tasks/delete",
    task_pb2.TaskExecAdded.DESCRIPTOR.full_name: "/tasks/exec-added",
    task_pb2.TaskExecStarted.DESCRIPTOR.full_name: "/tasks/exec-started",
    task_pb2.TaskPaused.DESCRIPTOR.full_name: "/tasks/paused",
    task_pb2.TaskResumed.DESCRIPTOR.full_name: "/tasks/resumed",
    task_pb2.TaskOOM.DESCRIPTOR.full_name: "/tasks/oom",
    task_pb2.TaskCheckpointed.DESCRIPTOR.full_name: "/tasks/checkpointed",
}

_EXIT = task_pb2.TaskExit.DESCRIPTOR.full_name

# Answers from containerd that say "this envelope is wrong", not "try later": resending the same bytes
# cannot succeed, and retrying forever would block every later event (an exit among them) behind it.
_REJECTIONS = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.PERMISSION_DENIED,
        Code.FAILED_PRECONDITION,
        Code.OUT_OF_RANGE,
        Code.UNIMPLEMENTED,
        Code.UNAUTHENTICATED,
    }
)

Spawn = Callable[[list[str], bytes], Awaitable[int]]
"""``spawn(argv, stdin_data)`` runs a process with ``stdin_data`` on its stdin and returns its exit status.

Injected so the project's reaper owns the wait (a second waiter would race it for the child's status)."""


@dataclass(slots=True)
class _Item:
    seq: int  # publish order; exits and the rest live in two deques and are merged by it
    envelope: events_pb2.Envelope
    is_exit: bool
    rejections: int = 0


class Publisher:
    """Forwards task events to containerd in publish order; see the module docstring for delivery.

    Transport: with ``ttrpc_address`` (``TTRPC_ADDRESS``), ``Events/Forward`` over one persistent ttrpc
    connection, opened lazily and reopened after failures with capped exponential backoff. Without it,
    the legacy path runs ``<publish_binary> --address <address> publish --topic T --namespace NS`` with
    the marshalled ``Any`` on stdin through ``spawn``, one process at a time, in order, retried likewise.

    Retries: connection errors, timeouts and other transient failures are retried without limit (the
    outbox waits for containerd). An answer that rejects the envelope itself (InvalidArgument,
    Unimplemented, ...) is retried ``max_rejections`` times and then the event is dropped with an error
    log, so one bad event cannot hold back every later one. A failing legacy publish process is always
    retried: its exit status does not tell a rejection from containerd being away.

    Bound: at most ``max_events`` events wait in the outbox (plus the one being sent). When a publish
    goes over it, the OLDEST non-exit events are dropped first; TaskExit events are dropped, oldest
    first, only when nothing else is left, because containerd learns exits from them and a lost exit
    leaves a task running forever in its eyes, whereas a lost start/oom/exec event only degrades what
    clients see. Each time this happens a warning gives the counts. The event being sent is never
    dropped: it may already be applied, and dropping it would not free anything.

    Not thread-safe: call :meth:`publish` from the event loop's thread.
    """

    def __init__(
        self,
        namespace: str,
        ttrpc_address: str | None,
        address: str,
        publish_binary: str | None = None,
        spawn: Spawn | None = None,
        *,
        max_events: int = 10000,
        call_timeout: float = 5.0,
        min_backoff: float = 0.05,
        max_backoff: float = 2.0,
        max_rejections: int = 5,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        if not ttrpc_address and not (publish_binary and spawn is not None):
            raise ValueError("events: need a ttrpc address, or a publish binary and a spawn callable")
        self.namespace = namespace
        self.ttrpc_address = ttrpc_address or None
        self.address = address
        self.publish_binary = publish_binary
        self._spawn = spawn
        self.max_events = max_events
        self.call_timeout = call_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_rejections = max_rejections

        # Two deques ordered by seq so that "drop the oldest non-exit" is a popleft, not a scan.
        self._exits: deque[_Item] = deque()
        self._others: deque[_Item] = deque()
        self._inflight: _Item | None = None  # taken off the deques; removed for good once acknowledged
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.delivered = 0
        self.dropped = 0  # by the bound or after rejections; cumulative, for logs and tests

    # -- producer side --------------------------------------------------------------------------
    def publish(self, event: Message) -> None:
        """Queue ``event`` (a containerd.events.Task* message), stamped now. Never blocks or awaits."""
        name = event.DESCRIPTOR.full_name
        topic = TOPICS.get(name)
        if topic is None:
            raise ValueError(f"events: no topic for {name}")
        envelope = events_pb2.Envelope(
            namespace=self.namespace,
            topic=topic,
            # The bare full name, as Go's typeurl registers it: containerd cannot resolve the
            # "type.googleapis.com/" form that Any.Pack would produce.
            event=AnyPB(type_url=name, value=event.SerializeToString()),
        )
        envelope.timestamp.GetCurrentTime()
        item = _Item(next(self._seq), envelope, name == _EXIT)
        (self._exits if item.is_exit else self._others).append(item)
        self._empty.clear()
        self._wakeup.set()
        if len(self._exits) + len(self._others) > self.max_events:
            self._enforce_bound()

    def _enforce_bound(self) -> None:
        excess = len(self._exits) + len(self._others) - self.max_events
        others = min(excess, len(self._others))
        topics: dict[str, int] = {}
        for _ in range(others):
            topic = self._others.popleft().envelope.topic
            topics[topic] = topics.get(topic, 0) + 1
        exits = excess - others
        for _ in range(exits):
            self._exits.popleft()
        self.dropped += excess
        log.warning(
            "events: outbox over %d events: dropped %d oldest non-exit events %s and %d exit events "
            "(%d dropped in total)",
            self.max_events,
            others,
            topics,
            exits,
            self.dropped,
        )

    @property
    def pending(self) -> int:
        """Events not yet acknowledged, the one being sent included."""
        return len(self._exits) + len(self._others) + (self._inflight is not None)

    def pending_envelopes(self) -> list[events_pb2.Envelope]:
        """The unacknowledged envelopes in delivery order (for diagnostics and tests)."""
        items = sorted(itertools.chain(self._exits, self._others), key=lambda i: i.seq)
        head = [self._inflight] if self._inflight is not None else []
        return [i.envelope for i in head + items]

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start forwarding on the running loop. Events published before are kept and sent first."""
        if self._closed:
            raise RuntimeError("events: publisher is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pyrunc-events")

    async def flush(self, timeout: float) -> bool:
        """Wait until every published event was acknowledged; False if ``timeout`` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            log.warning("events: flush timed out with %d events undelivered", self.pending)
            return False
        return True

    async def close(self) -> None:
        """Stop forwarding and close the connection. Undelivered events are lost: flush first."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client = self._disconnect()
        if client is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await client.wait_closed()

    # -- the forwarder --------------------------------------------------------------------------
    def _take(self) -> _Item | None:
        """The head of the outbox: the event in flight (unacknowledged) or else the oldest queued."""
        if self._inflight is None:
            ex, ot = self._exits, self._others
            if ex and (not ot or ex[0].seq < ot[0].seq):
                self._inflight = ex.popleft()
            elif ot:
                self._inflight = ot.popleft()
        return self._inflight

    def _done(self) -> None:
        self._inflight = None
        if not self._exits and not self._others:
            self._empty.set()

    async def _run(self) -> None:
        backoff = self.min_backoff
        failures = 0
        while True:
            item = self._take()
            if item is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._send(item)
            except asyncio.CancelledError:
                raise
            except TTRPCError as e:
                if e.code in _REJECTIONS:
                    item.rejections += 1
                    if item.rejections >= self.max_rejections:
                        self.dropped += 1
                        log.error(
                            "events: containerd rejected %s %d times, dropping it: %s",
                            item.envelope.topic,
                            item.rejections,
                            e,
                        )
                        self._done()
                        continue
                failures = self._failed(item, e, failures)
            except Exception as e:  # OSError from connect, a failing spawn, ...
                failures = self._failed(item, e, failures)
            else:
                if failures:
                    log.info("events: delivering again after %d failed attempts", failures)
                failures = 0
                backoff = self.min_backoff
                self.delivered += 1
                self._done()
                continue
            # Jitter, so that the shims of a restarted containerd do not all reconnect in lockstep (not
            # the random module: its import, seeding and state would sit in every server).
            await asyncio.sleep(backoff * (0.8 + 0.2 * os.urandom(1)[0] / 255))
            backoff = min(backoff * 2, self.max_backoff)

    def _failed(self, item: _Item, error: Exception, failures: int) -> int:
        # Warn once per outage; while containerd stays away every attempt would otherwise log.
        level = logging.WARNING if failures == 0 else logging.DEBUG
        log.log(level, "events: publishing %s failed (will retry): %s", item.envelope.topic, error)
        return failures + 1

    async def _send(self, item: _Item) -> None:
        if self.ttrpc_address is None:
            await self._send_legacy(item)
            return
        client = await self._connect()
        request = events_pb2.ForwardRequest(envelope=item.envelope)
        try:
            await client.call(EVENTS_SERVICE, "Forward", request, timeout=self.call_timeout)
        except ClosedError:
            self._disconnect()
            raise
        except TTRPCError as e:
            if e.code == Code.DEADLINE_EXCEEDED:
                # The connection may be wedged; a fresh one costs little and a late answer to the
                # old call must not be mistaken for anything.
                self._disconnect()
            raise

    async def _connect(self) -> Client:
        if self._client is not None and not self._client.closed:
            return self._client
        self._disconnect()
        assert self.ttrpc_address is not None
        async with asyncio.timeout(self.call_timeout):  # a full accept backlog makes connect hang
            self._client = await Client.connect(self.ttrpc_address, metadata={NAMESPACE_METADATA_KEY: self.namespace})
        return self._client

    def _disconnect(self) -> Client | None:
        client, self._client = self._client, None
        if client is not None:
            client.close()  # connection_lost will fail whatever was still pending on it
        return client

    async def _send_legacy(self, item: _Item) -> None:
        assert self.publish_binary is not None and self._spawn is not None
        argv = [
            self.publish_binary,
            "--address",
            self.address,
            "publish",
            "--topic",
            item.envelope.topic,
            "--namespace",
            self.namespace,
        ]
        # No timeout: we could not kill a hung child through spawn, and starting another one beside it
        # would only pile up processes and duplicates.
        status = await self._spawn(argv, item.envelope.event.SerializeToString())
        if status != 0:
            raise RuntimeError(f"{self.publish_binary} publish exited with status {status}")
