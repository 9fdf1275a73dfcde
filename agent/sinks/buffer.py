"""The buffer of one sink: closed batches waiting for acknowledgement, in `seq` order.

Memory first, bounded by `buffer.memory_bytes`. When memory is full (mode `overflow`),
batches spill to the disk buffer in `<buffer.disk_dir>/<sink name>/`, bounded by
`buffer.disk_bytes`; once anything is on disk, newer batches go to disk too, so the
entries in memory are always older than those on disk. Mode `always` writes every batch
to disk before it may be sent (and keeps a copy in memory while there is room, so it is
not read back). When the disk bound is hit too, or there is no disk buffer, the newest
batch is dropped: counted in `dropped_records`/`dropped_bytes`, logged at most once per
10 s per sink with the counts since the previous message. Delivery order is `seq` order,
whatever the batch's home; `seq` keeps growing across restarts.

Storage: SQLite (standard library) in WAL mode, one table keyed by `seq`, a batch per row
as one blob with a CRC-32 checked on every read (a row that fails the check is counted in
`corrupt_batches`, its records as dropped, deleted and skipped). Why SQLite rather than
segment files: the buffer needs deleting batches in any order (with several requests in
flight and per-item retries a later batch can be acknowledged first, and a retried batch is
rewritten smaller), a torn write must never be read back as data, and the high-water `seq`
must survive; SQLite gives all three with one INSERT/DELETE per batch, atomic commits and
crash recovery we do not have to write. `bench/disk_buffer_bench.py` measures it: with
1 MiB batches it writes and replays at 100-200 MB/s (fsync off or on) on the loaded 2-core
development machine, far above what one sink ships; every SQLite call, and the blob's
encoding, checksum and parsing, runs on the sink's single I/O thread, not on the event loop.

What a crash can lose (SQLite's documented WAL guarantees):
- the agent killed (SIGKILL, OOM): nothing committed to the disk buffer; in mode `always`
  that is every closed batch whose write had finished (at most `write_behind_bytes` of
  closed batches were still queued for their write, plus the open batch); in mode
  `overflow` the batches in memory are lost, as they would be without a disk buffer.
- the OS crashes or the power fails, `buffer.fsync: false` (`synchronous=NORMAL`): the
  batches committed since the last WAL checkpoint (SQLite syncs the WAL only when it
  checkpoints, every ~1000 pages = 4 MiB by default) may be rolled back; the database stays
  consistent. `buffer.fsync: true` (`synchronous=FULL`): the WAL is synced at every commit,
  so an OS crash loses no committed batch (a deleted batch may come back: it is resent).

Deleted rows leave free pages that are reused; when the disk buffer becomes empty the file
is shrunk (incremental vacuum and a WAL checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from agent.config import BufferConfig
from agent.sinks.base import Batch, SinkStats

if TYPE_CHECKING:  # imported where used: only with a disk buffer (~1 MiB of RSS)
    import sqlite3

log = logging.getLogger("podtap.sinks")

DB_NAME = "buffer.db"
PAGE_SIZE = 65536  # big pages: fewer overflow pages per 1 MiB blob (measured faster)
WAL_LIMIT_BYTES = 64 << 20  # the WAL file is truncated back to this after a checkpoint
SHRINK_MIN_BYTES = 16 << 20  # free pages worth giving back when the buffer is empty

# --------------------------------------------------------------------------- blob format
# header: magic, seq, created_ns, records, groups; then per group: its length, item
# count, the group bytes, the item lengths (u32 each), the items.
_MAGIC = b"PTB1"
_HEAD = struct.Struct("<4sqqII")
_GROUP = struct.Struct("<II")
_LITTLE = sys.byteorder == "little"


def encoded_size(batch: Batch) -> int:
    """Exactly len(encode_batch(batch))."""
    size = _HEAD.size
    for group, items in batch.groups.items():
        size += _GROUP.size + len(group) + 4 * len(items) + sum(map(len, items))
    return size


def encode_batch(batch: Batch) -> bytes:
    parts = [_HEAD.pack(_MAGIC, batch.seq, batch.created_ns, batch.records, len(batch.groups))]
    for group, items in batch.groups.items():
        lengths = array("I", map(len, items))
        if not _LITTLE:
            lengths.byteswap()
        parts += (_GROUP.pack(len(group), len(items)), group, lengths.tobytes())
        parts += items
    return b"".join(parts)


def decode_batch(seq: int, data: bytes) -> Batch | None:
    """The batch of a row whose checksum matched; None when the blob does not parse."""
    try:
        magic, bseq, created_ns, records, ngroups = _HEAD.unpack_from(data, 0)
        if magic != _MAGIC or bseq != seq:
            return None
        off = _HEAD.size
        groups: dict[bytes, list[bytes]] = {}
        nbytes = count = 0
        for _ in range(ngroups):
            glen, n = _GROUP.unpack_from(data, off)
            off += _GROUP.size
            group = data[off : off + glen]
            off += glen
            lengths = array("I")
            lengths.frombytes(data[off : off + 4 * n])
            if not _LITTLE:
                lengths.byteswap()
            off += 4 * n
            ends = list(accumulate(lengths, initial=off))
            groups[group] = [data[a:b] for a, b in zip(ends, ends[1:], strict=False)]
            nbytes += ends[-1] - off
            count += n
            off = ends[-1]
    except (struct.error, ValueError):
        return None
    if off != len(data) or count != records or len(groups) != ngroups:
        return None
    return Batch(seq=seq, groups=groups, records=records, nbytes=nbytes, created_ns=created_ns)


# --------------------------------------------------------------------------- the store
@dataclass(frozen=True, slots=True)
class StoredBatch:
    seq: int
    records: int
    nbytes: int
    created_ns: int
    size: int  # bytes of the blob


class DiskStore:
    """The SQLite file of one sink. Every method blocks: call them from one thread."""

    def __init__(self, directory: str, fsync: bool) -> None:
        self.directory = directory
        self.path = os.path.join(directory, DB_NAME)
        self.fsync = fsync
        self.db: sqlite3.Connection | None = None
        self.corrupt = 0  # rows that failed their checksum (read since open)

    def open(self) -> tuple[list[StoredBatch], int]:
        """Open (or create) the file: the stored batches in seq order, and the highest seq
        ever stored. A file that is not a database is moved aside (logged) and replaced."""
        import sqlite3
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        try:
            return self._open()
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            aside = f"{self.path}.corrupt-{time.time_ns()}"
            log.error("disk buffer %s is unreadable (%s); moved to %s", self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            return self._open()

    def _open(self) -> tuple[list[StoredBatch], int]:
        import sqlite3
        db = self.db = sqlite3.connect(self.path, isolation_level=None)
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes effect on a new file
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # likewise
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        db.execute(
            "CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " created_ns INTEGER NOT NULL, records INTEGER NOT NULL, nbytes INTEGER NOT NULL,"
            " size INTEGER NOT NULL, crc INTEGER NOT NULL, data BLOB NOT NULL)"
        )
        rows = [
            StoredBatch(*row)
            for row in db.execute(
                "SELECT seq, records, nbytes, created_ns, size FROM batches ORDER BY seq"
            )
        ]
        # AUTOINCREMENT keeps the largest seq ever inserted, even once deleted.
        high = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").fetchone()
        return rows, max(high[0] if high else 0, rows[-1].seq if rows else 0)

    def write(self, batch: Batch) -> None:
        """Insert the batch, or replace the row of the same seq (a retried remainder)."""
        self._insert(self._conn(), batch)

    def write_many(self, batches: Iterable[Batch]) -> None:
        """Insert several batches in one transaction (shutdown)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for batch in batches:
                self._insert(db, batch)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _insert(self, db: sqlite3.Connection, batch: Batch) -> None:
        data = encode_batch(batch)
        db.execute(
            "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
            (batch.seq, batch.created_ns, batch.records, batch.nbytes, len(data),
             zlib.crc32(data), data),
        )

    def read(self, seq: int) -> Batch | None:
        """The batch stored as `seq`; None when it is missing or corrupt (the corrupt row
        is deleted and counted in `corrupt`)."""
        import sqlite3
        db = self._conn()
        try:
            row = db.execute("SELECT crc, data FROM batches WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.DatabaseError as e:
            log.error("disk buffer %s: reading batch %d failed: %s", self.path, seq, e)
            row = (None, b"")
        if row is None:
            return None
        crc, data = row
        batch = decode_batch(seq, data) if zlib.crc32(data) == crc else None
        if batch is None:
            self.corrupt += 1
            self.delete(seq)
        return batch

    def delete(self, seq: int) -> None:
        self._conn().execute("DELETE FROM batches WHERE seq = ?", (seq,))

    def delete_many(self, seqs: list[int], shrink: bool) -> None:
        """Delete in one transaction (one commit, one sync with fsync on); then `shrink`."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM batches WHERE seq = ?", [(seq,) for seq in seqs])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if shrink:
            self.shrink()

    def shrink(self) -> None:
        """Give the free pages back to the file system (when the buffer is empty), if there
        are enough of them to be worth the checkpoint's syncs."""
        db = self._conn()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        (page,) = db.execute("PRAGMA page_size").fetchone()
        if free * page < SHRINK_MIN_BYTES:
            return
        db.execute("PRAGMA incremental_vacuum")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def _close_quietly(self) -> None:
        import sqlite3
        try:
            self.close()
        except sqlite3.Error:
            self.db = None

    def _conn(self) -> sqlite3.Connection:
        if self.db is None:
            raise RuntimeError("the disk buffer is closed")
        return self.db


# --------------------------------------------------------------------------- the buffer
class Entry:
    """One closed batch in the buffer. `batch` is its copy in memory (None: on disk only)."""

    __slots__ = ("batch", "created_ns", "home_disk", "nbytes", "records", "sending", "seq",
                 "size", "written")

    def __init__(self, batch: Batch | None, meta: Batch | StoredBatch, home_disk: bool,
                 size: int, written: bool) -> None:
        self.seq = meta.seq
        self.records = meta.records
        self.nbytes = meta.nbytes
        self.created_ns = meta.created_ns
        self.batch = batch
        self.home_disk = home_disk  # its durable copy is (being) written to disk
        self.written = written  # that copy is committed
        self.size = size  # bytes it takes on disk
        self.sending = False


class RateLimitedLog:
    """Counts events and logs them at most once per `interval_s`, with the counts since
    the previous message."""

    def __init__(self, what: str, sink: str, interval_s: float = 10.0) -> None:
        self.what = what
        self.sink = sink
        self.interval_s = interval_s
        self.last = -interval_s
        self.batches = self.records = self.nbytes = 0

    def add(self, now: float, records: int, nbytes: int) -> None:
        self.batches += 1
        self.records += records
        self.nbytes += nbytes
        self.maybe_log(now)

    def maybe_log(self, now: float, force: bool = False) -> None:
        if not self.batches or (now - self.last < self.interval_s and not force):
            return
        log.warning("sink %s: %s %d batches (%d records, %d bytes)", self.sink, self.what,
                    self.batches, self.records, self.nbytes, extra={"sink": self.sink})
        self.last = now
        self.batches = self.records = self.nbytes = 0


class SinkBuffer:
    """The ordered queue of one sink's closed batches (see the module docstring).

    Runs on the event loop; disk I/O goes to `io`, an executor with one thread (shared
    with the dead-letter store), so the writes, reads and deletes of the file happen in
    the order they were asked for. `wake` is called when a batch becomes ready to send.
    """

    def __init__(self, name: str, cfg: BufferConfig, stats: SinkStats, io: Executor,
                 monotonic: Callable[[], float], wake: Callable[[], None]) -> None:
        self.name = name
        self.cfg = cfg
        self.stats = stats
        self.io = io
        self.monotonic = monotonic
        self.wake = wake
        self.always = cfg.mode == "always"
        # Batches queued for their disk write (still in memory) at most; one always may be.
        self.write_behind_bytes = max(cfg.memory_bytes // 4, 4 << 20)
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.drops = RateLimitedLog("buffers full: dropped the newest", name)
        self.io_errors = RateLimitedLog("disk buffer write failed for", name)
        self._disk_entries = 0
        self._mem_bytes = 0  # batches held in memory (whatever their home)
        self._mem_home_bytes = 0  # entries whose only copy is in memory
        self._disk_bytes = 0
        self._pending_bytes = 0
        self.next_seq = 1
        # Deletes wait here while the previous ones are being done: one commit for many.
        self._deletes: list[int] = []
        self._deleting = False
        self.store: DiskStore | None = None
        if cfg.disk_dir:
            import sqlite3

            self.store = DiskStore(os.path.join(cfg.disk_dir, name), cfg.fsync)
            try:
                self._replay(*io.submit(self.store.open).result())
            except (OSError, sqlite3.Error) as e:
                raise OSError(f"sink {name}: cannot open the disk buffer in "
                              f"{self.store.directory}: {e}") from e
        self._update_gauges()

    # ----------------------------------------------------------------- state
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def records(self) -> int:
        return sum(e.records for e in self.entries.values())

    def _replay(self, stored: list[StoredBatch], high_seq: int) -> None:
        for row in stored:
            self.entries[row.seq] = Entry(None, row, home_disk=True, size=row.size, written=True)
            self._disk_bytes += row.size
        self._disk_entries = len(stored)
        self.next_seq = high_seq + 1
        if stored:
            log.info("sink %s: replaying %d batches (%d bytes) from the disk buffer",
                     self.name, len(stored), self._disk_bytes, extra={"sink": self.name})

    def _update_gauges(self) -> None:
        self.stats.memory_bytes_now = self._mem_bytes
        self.stats.disk_bytes_now = self._disk_bytes
        first = next(iter(self.entries.values()), None)
        self.stats.oldest_ns_now = first.created_ns if first is not None else 0

    def _hold(self, entry: Entry, batch: Batch | None) -> None:
        if entry.batch is not None:
            self._mem_bytes -= entry.batch.nbytes
        entry.batch = batch
        if batch is not None:
            self._mem_bytes += batch.nbytes

    # ----------------------------------------------------------------- in
    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def push(self, batch: Batch) -> None:
        """Queue a closed batch (its seq from `take_seq`); never blocks. Drops it (counted)
        when neither memory nor disk may take it."""
        size = encoded_size(batch) if self.store is not None else 0
        if self.always:
            if not self._disk_fits(batch, size):
                return self._drop(batch)
            self._append_to_disk(batch, size)
        elif self._disk_entries == 0 and self._mem_bytes + batch.nbytes <= self.cfg.memory_bytes:
            entry = Entry(None, batch, home_disk=False, size=0, written=False)
            self._hold(entry, batch)
            self._mem_home_bytes += batch.nbytes
            self.entries[batch.seq] = entry
        elif self.store is not None and self._disk_fits(batch, size):
            self._append_to_disk(batch, size)
        else:
            return self._drop(batch)
        self._update_gauges()
        self.wake()

    def _disk_fits(self, batch: Batch, size: int) -> bool:
        if self.store is None:
            return False
        if self._disk_bytes + size > self.cfg.disk_bytes:
            return False
        return self._pending_bytes == 0 or (
            self._pending_bytes + batch.nbytes <= self.write_behind_bytes)

    def _append_to_disk(self, batch: Batch, size: int) -> None:
        assert self.store is not None
        entry = Entry(None, batch, home_disk=True, size=size, written=False)
        self._hold(entry, batch)
        self.entries[batch.seq] = entry
        self._disk_entries += 1
        self._disk_bytes += entry.size
        self._pending_bytes += batch.nbytes
        future = asyncio.get_running_loop().run_in_executor(self.io, self.store.write, batch)
        future.add_done_callback(lambda f: self._written(entry, batch, f))

    def _written(self, entry: Entry, batch: Batch, future: asyncio.Future[None]) -> None:
        self._pending_bytes -= batch.nbytes
        error = future.exception() if not future.cancelled() else None
        if entry.seq not in self.entries:  # acknowledged meanwhile; its delete came after
            return
        if error is not None:
            self._write_failed(entry, error)
        else:
            entry.written = True
            if entry.batch is batch and (not self.always
                                         or self._mem_bytes > self.cfg.memory_bytes):
                self._hold(entry, None)  # read back from disk when its turn comes
        self._update_gauges()
        self.wake()

    def _write_failed(self, entry: Entry, error: BaseException) -> None:
        """The disk failed (full file system, I/O error): keep the batch in memory when
        memory has room (or it is being sent), else drop it like any batch that fits nowhere.
        Writes finish in seq order, so the older batches get the room first."""
        self.io_errors.add(self.monotonic(), entry.records, entry.nbytes)
        log.debug("sink %s: disk write of batch %d: %s", self.name, entry.seq, error)
        self._disk_entries -= 1
        self._disk_bytes -= entry.size
        entry.home_disk, entry.size = False, 0
        self._mem_home_bytes += entry.nbytes
        if entry.sending or self._mem_home_bytes <= self.cfg.memory_bytes:
            return
        batch = entry.batch
        self._remove(entry)
        if batch is not None:
            self._drop(batch)

    def _drop(self, batch: Batch) -> None:
        self.stats.dropped_records += batch.records
        self.stats.dropped_bytes += batch.nbytes
        self.drops.add(self.monotonic(), batch.records, batch.nbytes)

    # ----------------------------------------------------------------- out
    def take(self, limit: int) -> list[Entry]:
        """Up to `limit` of the oldest batches not being sent, in order, marked as being
        sent. Stops at a batch that may not be sent yet (mode always: not yet on disk)."""
        out: list[Entry] = []
        for entry in self.entries.values():
            if len(out) >= limit:
                break
            if entry.sending:
                continue
            if self.always and entry.home_disk and not entry.written:
                break
            entry.sending = True
            out.append(entry)
        return out

    async def load(self, entry: Entry) -> Batch | None:
        """The entry's batch, read from disk if needed; None when its row was corrupt (then
        it is counted, dropped and gone from the buffer)."""
        if entry.batch is not None:
            return entry.batch
        assert self.store is not None
        loop = asyncio.get_running_loop()
        corrupt_before = self.store.corrupt
        batch = await loop.run_in_executor(self.io, self.store.read, entry.seq)
        if batch is None:
            if self.store.corrupt > corrupt_before:
                self.stats.corrupt_batches += 1
                log.error("sink %s: batch %d in the disk buffer is corrupt; skipped (%d records)",
                          self.name, entry.seq, entry.records, extra={"sink": self.name})
            self.stats.dropped_records += entry.records
            self.stats.dropped_bytes += entry.nbytes
            self._remove(entry)
            self._update_gauges()
        return batch

    def resolve(self, entry: Entry) -> None:
        """The batch is done with (acknowledged, or dead-lettered): it leaves the buffer."""
        self._remove(entry)
        self._update_gauges()

    def requeue(self, entry: Entry, batch: Batch) -> None:
        """What is left of the batch to send again, at the same place (same seq). It stays
        in memory until sent; a smaller remainder also replaces the batch on disk."""
        entry.sending = False
        replaced = batch.records != entry.records or batch.nbytes != entry.nbytes
        self._hold(entry, batch)
        if not entry.home_disk:
            self._mem_home_bytes += batch.nbytes - entry.nbytes
        entry.records, entry.nbytes = batch.records, batch.nbytes
        if entry.home_disk and replaced and self.store is not None:
            size = encoded_size(batch)
            self._disk_bytes += size - entry.size
            entry.size = size
            future = asyncio.get_running_loop().run_in_executor(self.io, self.store.write, batch)
            future.add_done_callback(self._log_io_error)
        self._update_gauges()

    def release(self, entry: Entry) -> None:
        """The send was abandoned (cancelled): the batch stays, unchanged."""
        entry.sending = False

    def _remove(self, entry: Entry) -> None:
        if self.entries.pop(entry.seq, None) is None:
            return
        self._hold(entry, None)
        if not entry.home_disk:
            self._mem_home_bytes -= entry.nbytes
        elif self.store is not None:
            self._disk_entries -= 1
            self._disk_bytes -= entry.size
            self._deletes.append(entry.seq)
            if not self._deleting:
                self._submit_deletes()

    def _submit_deletes(self) -> None:
        assert self.store is not None
        seqs, self._deletes = self._deletes, []
        self._deleting = True
        future = asyncio.get_running_loop().run_in_executor(
            self.io, self.store.delete_many, seqs, self._disk_entries == 0)
        future.add_done_callback(self._deleted)

    def _deleted(self, future: asyncio.Future[None]) -> None:
        self._deleting = False
        self._log_io_error(future)
        if self._deletes:
            self._submit_deletes()

    def _log_io_error(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("sink %s: disk buffer: %s", self.name, future.exception(),
                      extra={"sink": self.name})

    # ----------------------------------------------------------------- lifecycle
    async def flushed(self) -> None:
        """Wait until every disk operation asked for so far is done."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.io, _nothing)
        while self._deleting or self._deletes:  # a delete job asked for on the way
            await loop.run_in_executor(self.io, _nothing)

    async def close(self) -> None:
        """Persist the batches that are only in memory (with their seq, so the next start
        sends them first), as far as the disk bound allows; count the rest as dropped."""
        await self.flushed()
        keep: list[Batch] = []
        lost: list[Batch] = []
        room = self.cfg.disk_bytes - self._disk_bytes
        for entry in list(self.entries.values()):
            if entry.home_disk or entry.batch is None:
                continue
            size = encoded_size(entry.batch)
            if self.store is not None and size <= room and not lost:
                keep.append(entry.batch)
                room -= size
            else:  # the newest are dropped
                lost.append(entry.batch)
        loop = asyncio.get_running_loop()
        if self.store is not None:
            import sqlite3

            try:
                if keep:
                    await loop.run_in_executor(self.io, self.store.write_many, keep)
                    log.info("sink %s: %d batches kept in the disk buffer for the next start",
                             self.name, len(keep), extra={"sink": self.name})
            except (OSError, sqlite3.Error) as e:
                log.error("sink %s: could not persist the buffer: %s", self.name, e,
                          extra={"sink": self.name})
                lost += keep
            await loop.run_in_executor(self.io, self.store.close)
        for batch in lost:
            self._drop(batch)
        self._mem_bytes = 0
        self._disk_bytes += sum(map(encoded_size, keep))
        self._update_gauges()
        self.drops.maybe_log(self.monotonic(), force=True)
        self.io_errors.maybe_log(self.monotonic(), force=True)


def _nothing() -> None:
    return None
