"""The interfaces of the sink stage, in one place.

    enriched lines --put()--> Sink: encode per container -> batch -> buffer (memory, disk)
                                     -> deliver (HTTP POST, ack, retry, dead letters)

`pipeline.py` is the only caller of a `Sink`. A sink is built from three parts:

- a `Codec`: what the backend wants. It makes one `ItemEncoder` per container (the
  metadata serialized once), turns the items of a closed batch into a request body,
  and reads the backend's answer into an `Outcome`;
- a `Transport`: how the body travels (HTTP with gzip, TLS, auth; or a file object);
- the shared machinery: batcher, memory and disk buffer, delivery with retries
  (`agent/sinks/runner.py`), the same for every sink.

Hot path: `Sink.put` runs on the event loop for every batch of lines; per line it is
one encoder lookup, one `ItemEncoder.encode` and one append. No dict is built per line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.capture.abi import STREAM_STDERR, STREAM_STDOUT
from agent.kube.model import ContainerMeta

STDOUT = STREAM_STDOUT
STDERR = STREAM_STDERR


class Origin:
    """A container as the sinks see it: its metadata, and one encoder slot per sink.

    The enricher makes one Origin per container (and a new one when the container's
    metadata changes); each sink caches its `ItemEncoder` in `encoders[sink.index]`.
    """

    __slots__ = ("cgroup_id", "encoders", "meta")

    def __init__(self, cgroup_id: int, meta: ContainerMeta, sinks: int) -> None:
        self.cgroup_id = cgroup_id
        self.meta = meta
        self.encoders: list[ItemEncoder | None] = [None] * sinks


# One line ready for the sinks: (origin, time in ns since the epoch (UTC), stream 1|2,
# message bytes without the newline, partial).
Enriched = tuple[Origin, int, int, bytes, bool]


class ItemEncoder(Protocol):
    """Encodes the lines of one container for one sink."""

    # The group the container's items go in, within a batch: b"" for a flat list of
    # items (Elasticsearch, HTTP), else the bytes that open the group and identify it
    # (a Loki stream's labels, an OTLP resource).
    group: bytes

    def encode(self, time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
        """One item (a record, a bulk action+source pair, a Loki value, an OTLP logRecord)."""
        ...


@dataclass(slots=True)
class Batch:
    """A closed batch: the unit that is buffered, persisted, sent and acknowledged.

    `groups` keeps the items in the order they were put, grouped by `ItemEncoder.group`
    (dicts keep insertion order). `seq` orders batches of one sink across memory,
    disk and restarts.
    """

    seq: int
    groups: dict[bytes, list[bytes]]
    records: int
    nbytes: int  # the items' bytes (what bounds the batch and the buffers)
    created_ns: int  # time.time_ns() when its first item was put
    attempts: int = 0

    def items(self) -> list[bytes]:
        return [item for items in self.groups.values() for item in items]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    sent_bytes: int = 0  # the request body as it went on the wire (compressed); 0 = unknown


class TransportError(Exception):
    """The request did not get an HTTP answer (connection refused, reset, timeout, TLS)."""


class Transport(Protocol):
    async def send(self, body: bytes) -> Response:
        """Send one request body; raise TransportError when there was no answer."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What to do with a batch after the backend answered.

    - delivered: records acknowledged (they leave the buffer);
    - retry: a batch with what must be sent again (all of it, or the items that got a
      retryable per-item error), None when nothing;
    - dead: (items, reason) that will never be accepted (they go to the dead-letter
      store with the reason, counted);
    - retry_after_s: the backend's Retry-After, if it gave one.
    """

    delivered: int = 0
    retry: Batch | None = None
    dead: list[tuple[list[bytes], str]] = field(default_factory=list)
    retry_after_s: float | None = None


class Codec(Protocol):
    """What one kind of backend wants, and where: the transport is built with its `url`
    (the full request URL), `content_type` and `extra_headers` (a tenant, say)."""

    url: str
    content_type: str
    extra_headers: dict[str, str]

    def encoder(self, meta: ContainerMeta) -> ItemEncoder: ...

    def body(self, batch: Batch) -> bytes:
        """The request body (before compression) for a batch."""
        ...

    def outcome(self, batch: Batch, response: Response) -> Outcome:
        """Read the backend's answer to `body(batch)`."""
        ...


# Upper bounds (seconds) of the send-latency histogram buckets; the last is +Inf.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class SinkStats:
    """What one sink did; read by telemetry at scrape time (no metrics calls per event).

    Counters only grow; `*_now` fields are gauges kept current by the sink.
    """

    records_in: int = 0  # lines put into the sink
    records_sent: int = 0  # acknowledged by the backend
    bytes_sent: int = 0  # request bodies acknowledged, as sent (after compression)
    batches_sent: int = 0
    retries: int = 0  # attempts after the first, of any batch
    failures: dict[str, int] = field(default_factory=dict)  # "429", "4xx", "5xx", "transport"
    dead_records: int = 0  # sent to the dead-letter store (never accepted)
    dropped_records: int = 0  # buffers full (memory and disk): the newest are dropped
    dropped_bytes: int = 0
    encode_errors: int = 0  # lines a codec could not encode (counted, skipped)
    corrupt_batches: int = 0  # disk-buffer batches that failed their checksum (records dropped)
    memory_bytes_now: int = 0
    disk_bytes_now: int = 0
    oldest_ns_now: int = 0  # created_ns of the oldest unacknowledged batch; 0 = none
    failing_since_ns: int = 0  # time.monotonic_ns() of the first failure in a row; 0 = ok
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0

    def observe_latency(self, seconds: float) -> None:
        i = 0
        for bound in LATENCY_BUCKETS_S:
            if seconds <= bound:
                break
            i += 1
        self.latency_counts[i] += 1
        self.latency_sum_s += seconds

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


class Sink(Protocol):
    """One configured destination; `pipeline.py` is its only caller."""

    name: str
    index: int  # this sink's slot in Origin.encoders
    stats: SinkStats

    def put(self, lines: Sequence[Enriched]) -> None:
        """Encode and batch; never blocks and never raises for a full buffer (drops
        are counted). Called on the event loop."""
        ...

    async def run(self) -> None:
        """Close batches by age and deliver them, until cancelled."""
        ...

    async def close(self, grace_s: float) -> None:
        """Close the open batch, deliver what can be delivered within `grace_s`,
        persist the rest (disk buffer), release resources."""
        ...

    def healthy(self, max_failing_s: float) -> bool:
        """False when deliveries have failed for longer than `max_failing_s`."""
        ...
