"""The delivery machinery every sink shares: batching, buffering, sending, retrying.

    put(lines) -> encode per container (the sink's ItemEncoder) -> the open batch
      -> closes by bytes, records or age -> SinkBuffer (memory, disk; agent/sinks/buffer.py)
      -> run(): codec.body -> transport.send -> codec.outcome
      -> acknowledged: leaves the buffer; retry: back at its place, after a backoff;
         dead: the dead-letter store (agent/sinks/deadletter.py)

Order: a batch is sent only after every older batch has been sent at least once. With
`max_in_flight` 1 batches are delivered strictly in `seq` order, so the order of each
container's lines holds across batches and retries. With N > 1, up to N consecutive
batches are in flight; when one of them must be retried, the younger ones already in
flight may be accepted before it (a container's lines can then arrive out of order across
at most N-1 batches). From then on, until the retried batch is accepted, only the oldest
batch is sent, one request at a time. Within a batch, a container's items keep their order
(the codec keeps it in a retried remainder).

At least once: a batch leaves the buffer only when the backend answered for each of its
items (accepted or dead-lettered). A request abandoned at shutdown, or by a SIGKILL, may
have been accepted: that batch is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as random_module
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from agent.config import SinkConfig
from agent.kube.model import ContainerMeta
from agent.sinks.base import (
    Batch,
    Codec,
    Enriched,
    ItemEncoder,
    Origin,
    Outcome,
    Response,
    SinkStats,
    Transport,
    TransportError,
)
from agent.sinks.buffer import Entry, RateLimitedLog, SinkBuffer
from agent.sinks.deadletter import DeadLetterStore, dead_letter_dir
from agent.sinks.retry import parse_retry_after, retry_delay_s, status_class

log = logging.getLogger("podtap.sinks")

FAILURE_LOG_INTERVAL_S = 10.0


class Clock(Protocol):
    """Time as the runner sees it (a test passes one that jumps instead of sleeping)."""

    def monotonic(self) -> float: ...

    def time_ns(self) -> int: ...

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        """Return when `event` is set or `timeout` seconds passed (None: no timeout)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time_ns(self) -> int:
        return time.time_ns()

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        if timeout is None:
            await event.wait()
            return
        if event.is_set():
            return
        # asyncio.timeout, not wait_for: no task per wait (the runner waits after each
        # batch it closes or sends).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                await event.wait()


class BatchingSink:
    """A `Sink`: the shared machinery around one codec and one transport."""

    def __init__(
        self,
        name: str,
        index: int,
        cfg: SinkConfig,
        codec: Codec,
        transport: Transport,
        clock: Clock | None = None,
        random: Callable[[], float] = random_module.random,
    ) -> None:
        self.name = name
        self.index = index
        self.cfg = cfg
        self.codec = codec
        self.transport = transport
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.random = random
        self.stats = SinkStats()
        self._wake = asyncio.Event()
        # One I/O thread per sink: disk buffer and dead letters, in the order asked.
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"podtap-sink-{name}")
        self.buffer = SinkBuffer(name, cfg.buffer, self.stats, self._io, self.clock.monotonic,
                                 self._wake.set)
        directory = dead_letter_dir(cfg.dead_letter_dir, cfg.buffer.disk_dir, name)
        self.dead_letters = (DeadLetterStore(directory, name, time_ns=self.clock.time_ns)
                             if directory else None)
        self._dead_log = RateLimitedLog("dead-lettered (never accepted)", name)
        # The open batch.
        self._groups: dict[bytes, list[bytes]] = {}
        self._records = 0
        self._bytes = 0
        self._created_ns = 0
        self._opened_at = 0.0
        # Delivery.
        self._inflight: dict[asyncio.Task[None], Entry] = {}
        self._retrying: set[int] = set()  # seqs waiting for a retry
        self._blocked_until = 0.0  # no new request before (backoff)
        self._failure_logged_at = -FAILURE_LOG_INTERVAL_S
        self._encoder_error_logged_at = -FAILURE_LOG_INTERVAL_S
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    # ----------------------------------------------------------------- batching (hot path)
    def put(self, lines: Sequence[Enriched]) -> None:
        if self._closed:
            self.stats.dropped_records += len(lines)
            return
        self.stats.records_in += len(lines)
        index = self.index
        max_bytes = self.cfg.batch.max_bytes
        max_records = self.cfg.batch.max_records
        groups = self._groups
        records = self._records
        nbytes = self._bytes
        # Consecutive lines mostly come from one container: its encoder's bound method
        # and its group's item list are looked up again only when the origin changes.
        last_origin: Origin | None = None
        encode: Callable[[int, int, bytes, bool], bytes] = _no_encoder
        key = b""
        group: list[bytes] | None = None
        for origin, time_ns, stream, message, partial in lines:
            if origin is not last_origin:
                encoder = origin.encoders[index]
                if encoder is None:
                    encoder = self._new_encoder(origin)
                    if encoder is None:
                        self.stats.encode_errors += 1
                        continue
                last_origin, encode, key, group = origin, encoder.encode, encoder.group, None
            try:
                item = encode(time_ns, stream, message, partial)
            except (ValueError, UnicodeError):
                self.stats.encode_errors += 1
                continue
            size = len(item)
            if records and nbytes + size > max_bytes:
                self._records, self._bytes = records, nbytes
                self._close_batch()
                groups, records, nbytes, group = self._groups, 0, 0, None
            if not records:
                self._created_ns = self.clock.time_ns()
                self._opened_at = self.clock.monotonic()
            if group is None:
                group = groups.get(key)
                if group is None:
                    group = groups[key] = []
            group.append(item)
            records += 1
            nbytes += size
            if records >= max_records:
                self._records, self._bytes = records, nbytes
                self._close_batch()
                groups, records, nbytes, group = self._groups, 0, 0, None
        if records and not self._records:
            self._wake.set()  # a batch opened: the runner arms its max_age timer
        self._records, self._bytes = records, nbytes

    def _new_encoder(self, origin: Origin) -> ItemEncoder | None:
        try:
            encoder = self.codec.encoder(origin.meta)
        except (ValueError, UnicodeError) as e:
            now = self.clock.monotonic()
            if now - self._encoder_error_logged_at >= FAILURE_LOG_INTERVAL_S:
                self._encoder_error_logged_at = now
                _log_encoder_error(self.name, origin.meta, e)
            return None
        origin.encoders[self.index] = encoder
        return encoder

    def _close_batch(self) -> None:
        if not self._records:
            return
        batch = Batch(seq=self.buffer.take_seq(), groups=self._groups, records=self._records,
                      nbytes=self._bytes, created_ns=self._created_ns)
        self._groups, self._records, self._bytes = {}, 0, 0
        self.buffer.push(batch)

    # ----------------------------------------------------------------- delivery
    async def run(self) -> None:
        if self._closed:
            return
        self._runner = asyncio.current_task()
        try:
            await self._deliver(deadline=None, until_empty=False)
        finally:
            self._runner = None

    async def _deliver(self, deadline: float | None, until_empty: bool) -> None:
        max_age = self.cfg.batch.max_age_s
        while True:
            now = self.clock.monotonic()
            self._wake.clear()
            if self._records and now - self._opened_at >= max_age:
                self._close_batch()
            self.buffer.drops.maybe_log(now)
            self._dead_log.maybe_log(now)
            if until_empty and not self.buffer.entries and not self._inflight:
                return
            if deadline is not None and now >= deadline:
                return
            if now >= self._blocked_until:
                self._start_sends()
            await self.clock.wait(self._wake, self._timeout(now, deadline))

    def _timeout(self, now: float, deadline: float | None) -> float | None:
        """Until the next thing that is due without a wake-up; None: nothing is."""
        due: list[float] = []
        if self._records:
            due.append(self._opened_at + self.cfg.batch.max_age_s)
        if self.buffer.entries and now < self._blocked_until:
            due.append(self._blocked_until)
        if deadline is not None:
            due.append(deadline)
        for pending in (self.buffer.drops, self._dead_log):
            if pending.batches:
                due.append(pending.last + pending.interval_s)
        return max(min(due) - now, 0.0) if due else None

    def _start_sends(self) -> None:
        allowed = 1 if self._retrying else self.cfg.max_in_flight
        if len(self._inflight) >= allowed:
            return
        for entry in self.buffer.take(allowed - len(self._inflight)):
            task = asyncio.create_task(self._send(entry), name=f"sink-{self.name}-{entry.seq}")
            self._inflight[task] = entry
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        entry = self._inflight.pop(task)
        if task.cancelled():
            self.buffer.release(entry)
        elif (error := task.exception()) is not None:
            log.error("sink %s: sending batch %d failed", self.name, entry.seq, exc_info=error,
                      extra={"sink": self.name})
            self.buffer.release(entry)
            self._blocked_until = self.clock.monotonic() + self.cfg.retry.max_backoff_s
        self._wake.set()

    async def _send(self, entry: Entry) -> None:
        batch = await self.buffer.load(entry)
        if batch is None:  # a corrupt row on disk: counted and gone
            self._retrying.discard(entry.seq)
            return
        try:
            body = self.codec.body(batch)
        except Exception as e:
            log.exception("sink %s: the codec could not make a request of batch %d",
                          self.name, batch.seq, extra={"sink": self.name})
            await self._dead_letter([(batch.items(), f"podtap: no request body: {e!r}")])
            self._resolve(entry)
            return
        if batch.attempts:
            self.stats.retries += 1
        batch.attempts += 1
        started = self.clock.monotonic()
        try:
            response = await self.transport.send(body)
        except TransportError as e:
            self.stats.fail("transport")
            self._failing(f"no answer: {e}")
            self._retry(entry, batch, batch, None)
            return
        self.stats.observe_latency(self.clock.monotonic() - started)
        kind = status_class(response.status)
        if kind is not None:
            self.stats.fail(kind)
        sent = response.sent_bytes or len(body)
        await self._settle(entry, batch, sent, response, self._outcome(batch, response))

    def _outcome(self, batch: Batch, response: Response) -> Outcome:
        try:
            return self.codec.outcome(batch, response)
        except Exception as e:
            log.exception("sink %s: the codec could not read the answer to batch %d",
                          self.name, batch.seq, extra={"sink": self.name})
            reason = f"podtap could not read the answer ({e!r}): HTTP {response.status} "
            return Outcome(dead=[(batch.items(), reason + _text(response.body))])

    async def _settle(self, entry: Entry, batch: Batch, body_bytes: int, response: Response,
                      outcome: Outcome) -> None:
        self.stats.records_sent += outcome.delivered
        if outcome.delivered:
            self.stats.bytes_sent += body_bytes
            self.stats.batches_sent += 1
        await self._dead_letter(outcome.dead)
        retry = outcome.retry if outcome.retry is not None and outcome.retry.records else None
        if outcome.delivered or (retry is None and not outcome.dead):
            self.stats.failing_since_ns = 0
        else:
            self._failing(f"HTTP {response.status}: {_text(response.body)[:200]}")
        if retry is None:
            self._resolve(entry)
            return
        retry_after = outcome.retry_after_s
        if retry_after is None:
            retry_after = parse_retry_after(response.headers.get("retry-after"),
                                            self.clock.time_ns() / 1e9)
        self._retry(entry, batch, retry, retry_after)

    def _resolve(self, entry: Entry) -> None:
        self._retrying.discard(entry.seq)
        self.buffer.resolve(entry)

    def _retry(self, entry: Entry, sent: Batch, retry: Batch, retry_after_s: float | None) -> None:
        """Send `retry` (all of `sent` or what is left of it) again at the same place."""
        retry.seq = entry.seq
        retry.attempts = sent.attempts
        delay = retry_delay_s(sent.attempts, retry_after_s, self.cfg.retry, self.random)
        self._blocked_until = max(self._blocked_until, self.clock.monotonic() + delay)
        self._retrying.add(entry.seq)
        self.buffer.requeue(entry, retry)

    def _failing(self, what: str) -> None:
        now = self.clock.monotonic()
        if not self.stats.failing_since_ns:
            self.stats.failing_since_ns = max(int(now * 1e9), 1)
        if now - self._failure_logged_at >= FAILURE_LOG_INTERVAL_S:
            self._failure_logged_at = now
            log.warning("sink %s: delivery failing (%s); retrying", self.name, what,
                        extra={"sink": self.name})

    async def _dead_letter(self, dead: list[tuple[list[bytes], str]]) -> None:
        for items, reason in dead:
            if not items:
                continue
            self.stats.dead_records += len(items)
            self._dead_log.add(self.clock.monotonic(), len(items), sum(map(len, items)))
            if self.dead_letters is None:
                continue
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._io, self.dead_letters.write, items, reason)
            except OSError as e:
                log.error("sink %s: dead-letter store %s: %s", self.name,
                          self.dead_letters.path, e, extra={"sink": self.name})

    # ----------------------------------------------------------------- health, shutdown
    async def preflight(self) -> str | None:
        """The transport's check at start (is the backend reachable?), if it has one."""
        check = getattr(self.transport, "preflight", None)
        return await check() if check is not None else None

    def healthy(self, max_failing_s: float) -> bool:
        since = self.stats.failing_since_ns
        return not since or self.clock.monotonic() * 1e9 - since <= max_failing_s * 1e9

    async def close(self, grace_s: float) -> None:
        if self._closed:
            return
        self._close_batch()
        self._closed = True
        runner = self._runner
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait({runner})
        if grace_s > 0:
            await self._deliver(deadline=self.clock.monotonic() + grace_s, until_empty=True)
        abandoned = list(self._inflight)
        for task in abandoned:
            task.cancel()
        if abandoned:
            await asyncio.wait(abandoned)
        await self.buffer.close()
        self._dead_log.maybe_log(self.clock.monotonic(), force=True)
        try:
            await self.transport.close()
        finally:
            self._io.shutdown(wait=False)


def _no_encoder(time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
    raise AssertionError("put() encodes only after looking up an encoder")


def _text(body: bytes) -> str:
    return body[:4096].decode("utf-8", "replace")


def _log_encoder_error(sink: str, meta: ContainerMeta, error: Exception) -> None:
    log.error("sink %s: cannot encode the lines of %s/%s/%s: %s", sink, meta.namespace,
              meta.pod_name, meta.container_name, error, extra={"sink": sink})
