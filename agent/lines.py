"""Per (pid, stream) line reassembly of captured write() chunks: the hot path.

Chunks arrive in order per process.  `LineAssembler.feed` cuts them at ``\\n`` and keeps
the bytes after the last newline pending per (pid, stream) key until the line is completed,
broken (`break_line`), its process ends (`end_process`), it idles (`flush_idle`), it is
evicted to bound memory (`max_streams`), or everything is flushed (`flush_all`).

Emitted lines are tuples ``(ts_ns, pid, stream, tag, message, partial)`` appended to a
caller-supplied list.  Each one covers one *segment* of its key's byte stream:
``message + (b"" if partial else b"\\n")``.  Invariant: for every key, the concatenation of
the segments emitted for it, in order, is exactly the concatenation of the bytes fed for it
(once `flush_all` has run).  ``ts_ns`` and ``tag`` of a line are those of the `feed` call
that contributed the first byte of its segment (for an empty non-partial line, that first
byte is its newline).  Bytes of different keys are never joined.

Length limit and exact multiples of ``max_line``
------------------------------------------------
No message is longer than ``max_line``.  As soon as a key's unterminated bytes *reach*
``max_line`` they are emitted as a ``max_line``-sized partial piece, so at most
``max_line - 1`` bytes stay pending per key.  A complete line of ``L`` bytes is therefore
always emitted as ``L // max_line`` partial pieces of exactly ``max_line`` bytes followed by
one non-partial piece of ``L % max_line`` bytes: a non-partial message is always strictly
shorter than ``max_line``, and it is empty exactly when ``L`` is a positive multiple of
``max_line`` (or when the line is genuinely empty).  This is the same whichever way the
bytes were cut into chunks, so the output never depends on write() boundaries (apart from
the explicit break / end / idle / eviction flushes, and the ts/tag attribution).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["Line", "LineAssembler"]

Line = tuple[int, int, int, object, bytes, bool]
#      (ts_ns, pid, stream, tag, message, partial)

# Pending state of one key is a small list (cheaper to build and index than an object):
#   [0] ts_ns of the feed that contributed the first pending byte
#   [1] tag of that feed
#   [2] ts_ns of the last feed of the key (for flush_idle)
#   [3] number of pending bytes, always 1 .. max_line - 1
#   [4] list of pending byte pieces, joined only when the line is emitted
_State = list[Any]


class LineAssembler:
    """Reassembles lines from in-order byte chunks, per (pid, stream)."""

    __slots__ = ("_max_line", "_idle_timeout_ns", "_max_streams", "_pending", "_pids")

    def __init__(
        self,
        max_line: int = 16384,
        idle_timeout_ns: int = 5_000_000_000,
        max_streams: int = 65536,
    ) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be >= 1, got {max_line}")
        if idle_timeout_ns < 0:
            raise ValueError(f"idle_timeout_ns must be >= 0, got {idle_timeout_ns}")
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self._max_line = max_line
        self._idle_timeout_ns = idle_timeout_ns
        self._max_streams = max_streams
        # (pid, stream) -> state, in least-recently-fed order (OrderedDict: O(1) access to
        # the oldest entry; a plain dict degrades when its front is popped repeatedly).
        self._pending: OrderedDict[tuple[int, int], _State] = OrderedDict()
        # pid -> streams of that pid that have pending state
        self._pids: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ hot path

    def feed(
        self, pid: int, stream: int, ts_ns: int, tag: object, data: bytes, out: list[Line]
    ) -> None:
        """Append the lines completed by `data` to `out`; keep the unterminated rest."""
        n = len(data)
        if not n:
            return
        key = (pid, stream)
        pending = self._pending
        st = pending.get(key)
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
                if len(pending) >= self._max_streams:
                    self._evict_oldest(out)
                pending[key] = [ts_ns, tag, ts_ns, n, [data]]
                streams = self._pids.get(pid)
                if streams is None:
                    self._pids[pid] = {stream}
                else:
                    streams.add(stream)
                return
        elif nl == n - 1:
            if st[3] + nl < self._max_line:
                # The chunk ends the pending line and holds no other newline.
                pieces = st[4]
                pieces.append(data[:nl])
                out.append((st[0], pid, stream, st[1], b"".join(pieces), False))
                del pending[key]
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
                pending.move_to_end(key)
                return
        self._feed_slow(key, pid, stream, ts_ns, tag, data, nl, st, out)

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
    ) -> None:
        # Everything the fast paths of `feed` do not handle; `nl` is data.find(b"\n").
        max_line = self._max_line
        append = out.append

        if st is not None:
            st[2] = ts_ns
            if nl < 0:
                # No newline, and the pending line reaches max_line: cut pieces.
                pieces = st[4]
                pieces.append(data)
                buf = b"".join(pieces)
                # The pending bytes are < max_line, so only the first piece starts in them.
                append((st[0], pid, stream, st[1], buf[:max_line], True))
                off = max_line
                n = len(buf)
                while n - off >= max_line:
                    end = off + max_line
                    append((ts_ns, pid, stream, tag, buf[off:end], True))
                    off = end
                if off < n:
                    st[0] = ts_ns
                    st[1] = tag
                    st[3] = n - off
                    st[4] = [buf[off:]]
                    self._pending.move_to_end(key)
                else:
                    self._drop(key, pid, stream)
                return
            parts = data.split(b"\n")
            # The first newline completes the pending line.
            pieces = st[4]
            pieces.append(parts[0])
            first = b"".join(pieces)
            n = len(first)
            if n < max_line:
                append((st[0], pid, stream, st[1], first, False))
            else:
                append((st[0], pid, stream, st[1], first[:max_line], True))
                off = max_line
                while n - off >= max_line:
                    end = off + max_line
                    append((ts_ns, pid, stream, tag, first[off:end], True))
                    off = end
                append((ts_ns, pid, stream, tag, first[off:], False))
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
                        append((ts_ns, pid, stream, tag, p[off:end], True))
                        off = end
                    append((ts_ns, pid, stream, tag, p[off:] if off else p, False))
        n = len(tail)
        off = 0
        while n - off >= max_line:
            end = off + max_line
            append((ts_ns, pid, stream, tag, tail[off:end], True))
            off = end
        if off < n:
            if off:
                tail = tail[off:]
            if st is not None:
                # Reuse the state of the key (still registered) for the new partial line.
                st[0] = ts_ns
                st[1] = tag
                st[3] = n - off
                st[4] = [tail]
                self._pending.move_to_end(key)
            else:
                self._new_state(key, pid, stream, [ts_ns, tag, ts_ns, n - off, [tail]], out)
        elif st is not None:
            self._drop(key, pid, stream)

    # ------------------------------------------------------------------ state helpers

    def _new_state(
        self, key: tuple[int, int], pid: int, stream: int, st: _State, out: list[Line]
    ) -> None:
        pending = self._pending
        if len(pending) >= self._max_streams:
            self._evict_oldest(out)
        pending[key] = st
        streams = self._pids.get(pid)
        if streams is None:
            self._pids[pid] = {stream}
        else:
            streams.add(stream)

    def _evict_oldest(self, out: list[Line]) -> None:
        (pid, stream), st = self._pending.popitem(last=False)
        self._unindex(pid, stream)
        out.append((st[0], pid, stream, st[1], b"".join(st[4]), True))

    def _drop(self, key: tuple[int, int], pid: int, stream: int) -> None:
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
            out.append((st[0], pid, stream, st[1], b"".join(st[4]), True))

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

    # ------------------------------------------------------------------ introspection

    @property
    def pending_streams(self) -> int:
        """Number of (pid, stream) keys with pending bytes."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Total number of pending bytes (computed on demand, not on the hot path)."""
        return sum(st[3] for st in self._pending.values())
