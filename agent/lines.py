"""Per (pid, stream) line reassembly of captured write() chunks: the hot path.

Chunks arrive in order per process.  `LineAssembler.feed` cuts them at ``\\n`` and keeps
the bytes after the last newline pending per (pid, stream) key until the line is completed,
broken (`break_line`), its process ends (`end_process`), the thread that wrote it last ends
(`end_thread`), it idles (`flush_idle`), it is evicted to bound memory (`max_streams`,
`max_pending_bytes`), or everything is flushed (`flush_all`).  `process` takes the capture's
records as they come and does all of this from their types and flags.

Emitted lines are tuples ``(ts_ns, pid, stream, tag, message, partial)`` appended to a
caller-supplied list.  Each one covers one *segment* of its key's byte stream:
``message + (b"" if partial else b"\\n")``.  Invariant: for every key, the concatenation of
the segments emitted for it, in order, is exactly the concatenation of the bytes fed for it
(once `flush_all` has run).  ``ts_ns`` and ``tag`` of a line are those of the `feed` call
that contributed the first byte of its segment (for an empty non-partial line, that first
byte is its newline; a piece that starts with a UTF-8 character held back at a cut, see
below, may get the feed that completed that character).  Bytes of different keys are never
joined, nor bytes of one key across a gap (lost bytes, a truncated write, another owner).

Length limit
------------
No message is longer than ``max_line``.  As soon as a key's unterminated bytes *reach*
``max_line`` a piece of them is emitted, partial: ``max_line`` bytes, or up to 3 fewer where
the cut would fall inside a UTF-8 character (judged on the bytes before the cut only: a lead
byte whose sequence crosses the cut, followed by continuation bytes; the rest of the
character then starts the next piece).  So fewer than ``max_line`` bytes stay pending per
key, a non-partial message is always shorter than ``max_line``, valid UTF-8 is never cut
inside a character (for ``max_line >= 4``), and since the cut depends only on the line's
bytes, the output does not depend on write() boundaries (apart from the explicit break / end
/ idle / eviction flushes, and the ts/tag attribution).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from agent.capture.abi import EV_CGROUP, EV_DATA, EV_EXIT, EV_THREAD_EXIT, F_LOSS, F_TRUNCATED
from agent.capture.events import boottime_ns
from agent.config import Config

__all__ = ["Line", "LineAssembler", "Record"]

Line = tuple[int, int, int, object, bytes, bool]
#      (ts_ns, pid, stream, tag, message, partial)
Record = tuple[int, int, int, int, int, int, int, bytes, bytes]
#        (ts_ns, cgroup_id, pid, tid, type, stream, flags, comm, data): a decoded capture record

_EV_DATA = EV_DATA  # module globals: the hot loop reads them without an attribute lookup
_EV_EXIT = EV_EXIT
_EV_THREAD_EXIT = EV_THREAD_EXIT
_F_LOSS = F_LOSS
_F_TRUNCATED = F_TRUNCATED
_GAP_FLAGS = _F_LOSS | _F_TRUNCATED

# Pending state of one key is a small list (cheaper to build and index than an object):
#   [0] ts_ns of the feed that contributed the first pending byte
#   [1] tag of that feed
#   [2] ts_ns of the last feed of the key (for flush_idle)
#   [3] number of pending bytes, always 1 .. max_line - 1
#   [4] list of pending byte pieces, joined only when the line is emitted
#   [5] tid of the last feed (for end_thread)
#   [6] owner of the line (the writer's cgroup id): a pid seen with another owner is reused
_State = list[Any]


def _char_cut(buf: bytes, off: int, end: int) -> int:
    """End of a piece [off, end): `end`, or the start of a UTF-8 character that would be cut
    there (a lead byte whose sequence crosses `end`, and only continuation bytes after it).
    Called only when buf[end - 1] is not ASCII.  Never returns `off` (no empty piece)."""
    j = end - 1
    low = max(off + 1, end - 3)
    while j >= low:
        b = buf[j]
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return j if b <= 0xF4 and b >= 0xC2 and j + need > end else end
        if b < 0x80:
            return end
        j -= 1
    return end


class LineAssembler:
    """Reassembles lines from in-order byte chunks, per (pid, stream)."""

    __slots__ = (
        "_max_line",
        "_idle_timeout_ns",
        "_max_streams",
        "_max_bytes",
        "_bytes",
        "_pending",
        "_pids",
    )

    def __init__(
        self,
        max_line: int = 16384,
        idle_timeout_ns: int = 5_000_000_000,
        max_streams: int = 65536,
        max_pending_bytes: int = 16 << 20,
    ) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be >= 1, got {max_line}")
        if idle_timeout_ns < 0:
            raise ValueError(f"idle_timeout_ns must be >= 0, got {idle_timeout_ns}")
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if max_pending_bytes < max_line:
            raise ValueError(
                f"max_pending_bytes must be >= max_line ({max_line}), got {max_pending_bytes}"
            )
        self._max_line = max_line
        self._idle_timeout_ns = idle_timeout_ns
        self._max_streams = max_streams
        self._max_bytes = max_pending_bytes
        self._bytes = 0  # pending bytes of all keys
        # (pid, stream) -> state, in least-recently-fed order (OrderedDict: O(1) access to
        # the oldest entry; a plain dict degrades when its front is popped repeatedly).
        self._pending: OrderedDict[tuple[int, int], _State] = OrderedDict()
        # pid -> streams of that pid that have pending state
        self._pids: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ records

    def process(
        self,
        records: Iterable[Record],
        out: list[Line],
        other: Callable[[Record], None] | None = None,
    ) -> None:
        """Feed data records, end lines at gaps and exits; hand other records to `other`.

        A data record flagged F_LOSS follows lost bytes of its (pid, stream): the pending
        line ends before it.  One flagged F_TRUNCATED misses the end of its write: the line
        ends after it.  The tag of a line is ``(cgroup_id, comm)`` of its first record.
        """
        feed = self.feed
        append = out.append
        pending = self._pending
        max_line = self._max_line
        for rec in records:
            ts, cgroup_id, pid, tid, typ, stream, flags, comm, data = rec
            if typ == _EV_DATA:
                n = len(data)
                if flags & _GAP_FLAGS:
                    self._feed_at_gap(rec, out)
                elif not pending and 0 < n < max_line and data.find(b"\n") == n - 1:
                    # feed()'s first fast path, inlined: no line is pending anywhere and
                    # the write is exactly one line (the usual one-line write()).
                    append((ts, pid, stream, (cgroup_id, comm), data[:-1], False))
                else:
                    feed(pid, stream, ts, (cgroup_id, comm), data, out, tid, cgroup_id)
            elif typ == _EV_EXIT:
                self.end_process(pid, out)
            elif typ == _EV_THREAD_EXIT:
                self.end_thread(pid, tid, out)
            elif other is not None:
                other(rec)

    def _feed_at_gap(self, rec: Record, out: list[Line]) -> None:
        ts, cgroup_id, pid, tid, _typ, stream, flags, comm, data = rec
        if flags & _F_LOSS:
            self.break_line(pid, stream, out)
        self.feed(pid, stream, ts, (cgroup_id, comm), data, out, tid, cgroup_id)
        if flags & _F_TRUNCATED:
            self.break_line(pid, stream, out)

    # ------------------------------------------------------------------ hot path

    def feed(
        self,
        pid: int,
        stream: int,
        ts_ns: int,
        tag: object,
        data: bytes,
        out: list[Line],
        tid: int = 0,
        owner: int = 0,
    ) -> None:
        """Append the lines completed by `data` to `out`; keep the unterminated rest.

        `tid` is the writing thread (see `end_thread`); `owner` identifies the process
        beyond its pid (the capture passes the cgroup id): bytes of a pid seen with another
        owner than its pending line's are never joined to that line, which ends first.
        """
        n = len(data)
        key = (pid, stream)
        pending = self._pending
        st = pending.get(key)
        if not n:
            if st is not None and st[6] != owner:
                self.break_line(pid, stream, out)
            return
        nl = data.find(b"\n")
        if st is None:
            if n < self._max_line:
                # Fast path: nothing pending and every piece is shorter than max_line.
                if nl == n - 1:  # exactly one line
                    out.append((ts_ns, pid, stream, tag, data[:nl], False))
                    return
                if nl >= 0:
                    parts = data.split(b"\n")
                    data = parts.pop()
                    out += [(ts_ns, pid, stream, tag, p, False) for p in parts]
                    n = len(data)
                    if not n:
                        return
                # New pending line (inline _new_state).
                total = self._bytes + n
                if total > self._max_bytes or len(pending) >= self._max_streams:
                    self._make_room(n, out)
                    total = self._bytes + n
                self._bytes = total
                pending[key] = [ts_ns, tag, ts_ns, n, [data], tid, owner]
                streams = self._pids.get(pid)
                if streams is None:
                    self._pids[pid] = {stream}
                else:
                    streams.add(stream)
                return
        elif st[6] != owner:
            # The pid was reused (its exit was not seen): the old line ends here.
            self.break_line(pid, stream, out)
            self.feed(pid, stream, ts_ns, tag, data, out, tid, owner)
            return
        elif nl == n - 1:
            if st[3] + nl < self._max_line:
                # The chunk ends the pending line and holds no other newline.
                pieces = st[4]
                pieces.append(data[:nl])
                out.append((st[0], pid, stream, st[1], b"".join(pieces), False))
                del pending[key]
                self._bytes -= st[3]
                streams = self._pids[pid]
                if len(streams) == 1:
                    del self._pids[pid]
                else:
                    streams.discard(stream)
                return
        elif nl < 0:
            size = st[3] + n
            if size < self._max_line:
                # The pending line grows.
                st[2] = ts_ns
                st[3] = size
                st[4].append(data)
                st[5] = tid
                pending.move_to_end(key)
                total = self._bytes + n
                self._bytes = total
                if total > self._max_bytes:
                    self._make_room(0, out)
                return
        self._feed_slow(key, pid, stream, ts_ns, tag, data, nl, st, out, tid, owner)

    def _feed_slow(
        self,
        key: tuple[int, int],
        pid: int,
        stream: int,
        ts_ns: int,
        tag: object,
        data: bytes,
        nl: int,
        st: _State | None,
        out: list[Line],
        tid: int,
        owner: int,
    ) -> None:
        # Everything the fast paths of `feed` do not handle; `nl` is data.find(b"\n").
        max_line = self._max_line
        append = out.append

        if st is not None:
            st[2] = ts_ns
            self._bytes -= st[3]  # added back below for what stays pending
            if nl < 0:
                # No newline, and the pending line reaches max_line: cut pieces.
                pieces = st[4]
                pieces.append(data)
                buf = b"".join(pieces)
                n = len(buf)
                first = True
                off = 0
                while n - off >= max_line:
                    end = off + max_line
                    if buf[end - 1] & 0x80:
                        end = _char_cut(buf, off, end)
                    if first:
                        # Only the first piece surely starts in the pending bytes.
                        append((st[0], pid, stream, st[1], buf[:end], True))
                        first = False
                    else:
                        append((ts_ns, pid, stream, tag, buf[off:end], True))
                    off = end
                if off < n:
                    st[0] = ts_ns
                    st[1] = tag
                    st[3] = n - off
                    st[4] = [buf[off:]]
                    st[5] = tid
                    self._bytes += n - off
                    self._pending.move_to_end(key)
                    if self._bytes > self._max_bytes:
                        self._make_room(0, out)
                else:
                    self._drop(key, pid, stream)
                return
            parts = data.split(b"\n")
            # The first newline completes the pending line.
            pieces = st[4]
            pieces.append(parts[0])
            first_line = b"".join(pieces)
            n = len(first_line)
            if n < max_line:
                append((st[0], pid, stream, st[1], first_line, False))
            else:
                end = max_line
                if first_line[end - 1] & 0x80:
                    end = _char_cut(first_line, 0, end)
                append((st[0], pid, stream, st[1], first_line[:end], True))
                off = end
                while n - off >= max_line:
                    end = off + max_line
                    if first_line[end - 1] & 0x80:
                        end = _char_cut(first_line, off, end)
                    append((ts_ns, pid, stream, tag, first_line[off:end], True))
                    off = end
                append((ts_ns, pid, stream, tag, first_line[off:], False))
            start = 1  # parts[0] is done
        else:
            parts = data.split(b"\n") if nl >= 0 else [data]
            start = 0

        # parts[start:-1] are complete lines and parts[-1] the unterminated tail, all of
        # this feed, with nothing pending before them.
        tail = parts.pop()
        if len(parts) > start:
            rest = parts[start:] if start else parts
            if max(map(len, rest)) < max_line:
                out += [(ts_ns, pid, stream, tag, p, False) for p in rest]
            else:
                for p in rest:
                    n = len(p)
                    off = 0
                    while n - off >= max_line:
                        end = off + max_line
                        if p[end - 1] & 0x80:
                            end = _char_cut(p, off, end)
                        append((ts_ns, pid, stream, tag, p[off:end], True))
                        off = end
                    append((ts_ns, pid, stream, tag, p[off:] if off else p, False))
        n = len(tail)
        off = 0
        while n - off >= max_line:
            end = off + max_line
            if tail[end - 1] & 0x80:
                end = _char_cut(tail, off, end)
            append((ts_ns, pid, stream, tag, tail[off:end], True))
            off = end
        if off < n:
            if off:
                tail = tail[off:]
            left = n - off
            if st is not None:
                # Reuse the state of the key (still registered) for the new partial line.
                st[0] = ts_ns
                st[1] = tag
                st[3] = left
                st[4] = [tail]
                st[5] = tid
                self._pending.move_to_end(key)
                self._bytes += left
                if self._bytes > self._max_bytes:
                    self._make_room(0, out)
            else:
                if self._bytes + left > self._max_bytes or len(self._pending) >= self._max_streams:
                    self._make_room(left, out)
                self._new_state(key, pid, stream, [ts_ns, tag, ts_ns, left, [tail], tid, owner])
        elif st is not None:
            self._drop(key, pid, stream)

    # ------------------------------------------------------------------ state helpers

    def _new_state(self, key: tuple[int, int], pid: int, stream: int, st: _State) -> None:
        self._pending[key] = st
        self._bytes += st[3]
        streams = self._pids.get(pid)
        if streams is None:
            self._pids[pid] = {stream}
        else:
            streams.add(stream)

    def _make_room(self, incoming: int, out: list[Line]) -> None:
        """Evict the least recently fed lines until a new line of `incoming` bytes fits
        (0: the most recently fed line, already counted, is the one that grew)."""
        pending = self._pending
        limit = self._max_bytes - incoming
        max_keys = self._max_streams - 1 if incoming else self._max_streams
        while pending and (self._bytes > limit or len(pending) > max_keys):
            self._evict_oldest(out)

    def _evict_oldest(self, out: list[Line]) -> None:
        (pid, stream), st = self._pending.popitem(last=False)
        self._bytes -= st[3]
        self._unindex(pid, stream)
        out.append((st[0], pid, stream, st[1], b"".join(st[4]), True))

    def _drop(self, key: tuple[int, int], pid: int, stream: int) -> None:
        # The caller has already taken the key's bytes out of self._bytes.
        del self._pending[key]
        self._unindex(pid, stream)

    def _unindex(self, pid: int, stream: int) -> None:
        streams = self._pids[pid]
        streams.discard(stream)
        if not streams:
            del self._pids[pid]

    # ------------------------------------------------------------------ flushes

    def break_line(self, pid: int, stream: int, out: list[Line]) -> None:
        """Emit the pending bytes of (pid, stream) as a partial line and forget them.

        Used when bytes of the stream were lost, so unrelated bytes are never joined.
        """
        st = self._pending.pop((pid, stream), None)
        if st is not None:
            self._bytes -= st[3]
            self._unindex(pid, stream)
            out.append((st[0], pid, stream, st[1], b"".join(st[4]), True))

    def end_process(self, pid: int, out: list[Line]) -> None:
        """The process exited: emit its pending bytes (all streams) as partial, drop it."""
        streams = self._pids.pop(pid, None)
        if streams is None:
            return
        pending = self._pending
        for stream in sorted(streams):
            st = pending.pop((pid, stream))
            self._bytes -= st[3]
            out.append((st[0], pid, stream, st[1], b"".join(st[4]), True))

    def end_thread(self, pid: int, tid: int, out: list[Line]) -> None:
        """Thread `tid` of process `pid` exited: emit (partial) the pid's pending lines
        that it wrote last; lines another thread of the process continued stay."""
        streams = self._pids.get(pid)
        if streams is None:
            return
        pending = self._pending
        for stream in sorted(streams):
            if pending[(pid, stream)][5] == tid:
                self.break_line(pid, stream, out)

    def flush_idle(self, now_ns: int, out: list[Line]) -> None:
        """Emit as partial every pending line whose last feed is over idle_timeout_ns old.

        Walks the keys from the least recently fed one and stops at the first key that is
        not idle, so the cost is proportional to what is flushed.  The walk follows feed
        order, not timestamps: if feed timestamps are not monotonic across keys, an idle key
        queued behind a fresher one is flushed late, by at most that timestamp skew.
        """
        pending = self._pending
        deadline = now_ns - self._idle_timeout_ns
        while pending:
            key = next(iter(pending))
            st = pending[key]
            if st[2] >= deadline:
                break
            del pending[key]
            self._bytes -= st[3]
            pid, stream = key
            self._unindex(pid, stream)
            out.append((st[0], pid, stream, st[1], b"".join(st[4]), True))

    def flush_all(self, out: list[Line]) -> None:
        """Emit every pending line as partial (least recently fed first) and clear state."""
        out += [
            (st[0], pid, stream, st[1], b"".join(st[4]), True)
            for (pid, stream), st in self._pending.items()
        ]
        self._pending.clear()
        self._pids.clear()
        self._bytes = 0

    # ------------------------------------------------------------------ introspection

    @property
    def pending_streams(self) -> int:
        """Number of (pid, stream) keys with pending bytes."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Total number of pending bytes."""
        return self._bytes


class LineStage:
    """Records -> lines (`LineAssembler.process`), counted; cgroup records to discovery."""

    def __init__(
        self, cfg: Config, on_cgroup: Callable[[int, str, int], None] | None = None
    ) -> None:
        self.on_cgroup = on_cgroup
        self.assembler = LineAssembler(
            max_line=cfg.lines.max_line,
            idle_timeout_ns=cfg.lines.idle_flush_ms * 1_000_000,
            max_streams=cfg.lines.max_streams,
            max_pending_bytes=cfg.lines.max_pending_bytes,
        )
        self.lines = 0
        self.partial = 0

    def process(self, records: list[Record]) -> list[Line]:
        out: list[Line] = []
        self.assembler.process(records, out, self._other)
        return self._counted(out)

    def _other(self, rec: Record) -> None:
        if rec[4] == EV_CGROUP and self.on_cgroup is not None:
            self.on_cgroup(rec[1], rec[8].decode("utf-8", "replace"), rec[0])

    def flush_idle(self) -> list[Line]:
        out: list[Line] = []
        self.assembler.flush_idle(boottime_ns(), out)
        return self._counted(out)

    def flush_all(self) -> list[Line]:
        out: list[Line] = []
        self.assembler.flush_all(out)
        return self._counted(out)

    def _counted(self, out: list[Line]) -> list[Line]:
        self.lines += len(out)
        self.partial += sum(1 for line in out if line[5])
        return out
