"""Lines -> enriched lines for the sinks, holding the lines of containers not known yet.

Each known container gets one `Origin` (its metadata and the sinks' encoder slots);
an enriched line is `(origin, unix time ns, stream, message, partial)`. The boot-clock
timestamps of the kernel become Unix time with the offset read once per batch, so a
clock step (NTP, a VM resume) shows in the next batch, not never.

A container may write before the agent has its metadata (its first lines come
from the kernel flagged "unknown").  Its lines are held, in order, per cgroup
(bounded in bytes and in time, and counted when a bound is hit) and released
— enriched and in their original order — as soon as discovery resolves the
cgroup.  While a cgroup has held lines, every later line of it is held too,
so order is kept across the release.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.capture.abi import STREAM_STDOUT
from agent.kube.discovery import Known
from agent.lines import Line
from agent.sinks.base import Enriched, Origin

STDOUT = STREAM_STDOUT
HELD_LINE_OVERHEAD = 96  # bytes a held line costs beyond its message (tuple, ints, list slot)


@dataclass(slots=True)
class Held:
    since_ns: int
    lines: list[Line] = field(default_factory=list)
    nbytes: int = 0


@dataclass(slots=True)
class EnrichStats:
    records: int = 0
    held_lines: int = 0  # lines that had to wait for their container's metadata
    released_lines: int = 0
    excluded_lines: int = 0  # held lines of a container that turned out excluded
    dropped_hold_full: int = 0  # lines dropped: the hold buffer was full
    dropped_unresolved: int = 0  # lines dropped: container never resolved in time


class Enricher:
    def __init__(
        self,
        lookup: Callable[[int], Known | None],
        sinks: int,
        realtime_offset_ns: Callable[[], int],
        hold_max_bytes: int,
        hold_timeout_ns: int,
        on_unknown: Callable[[int], None],
    ) -> None:
        self.lookup = lookup
        self.sinks = sinks
        self.realtime_offset_ns = realtime_offset_ns
        self.hold_max_bytes = hold_max_bytes
        self.hold_timeout_ns = hold_timeout_ns
        self.on_unknown = on_unknown
        self.origins: dict[int, tuple[Origin, bool, bool]] = {}
        self.held: dict[int, Held] = {}
        self.held_bytes = 0
        self.stats = EnrichStats()

    def process(self, lines: list[Line], out: list[Enriched]) -> None:
        """Enrich what can be enriched now, in order; hold the rest."""
        origins, held = self.origins, self.held
        offset = self.realtime_offset_ns() if lines else 0
        before = len(out)
        for line in lines:
            ts, _pid, stream, tag, message, partial = line
            cg: int = tag[0]  # type: ignore[index]
            # A container is never both known (in origins) and held: release() takes a
            # container out of the hold as soon as its origin is made.
            entry = origins.get(cg)
            if entry is None:
                entry = None if cg in held else self._origin(cg)
                if entry is None:
                    self._hold(cg, line)
                    continue
            origin, keep_out, keep_err = entry
            if keep_out if stream == STDOUT else keep_err:
                out.append((origin, ts + offset, stream, message, partial))
        self.stats.records += len(out) - before

    def _origin(self, cg: int) -> tuple[Origin, bool, bool] | None:
        known = self.lookup(cg)
        if known is None:
            return None
        entry = (Origin(cg, known.meta, self.sinks), known.capture_stdout, known.capture_stderr)
        self.origins[cg] = entry
        return entry

    def _hold(self, cg: int, line: Line) -> None:
        size = len(line[4]) + HELD_LINE_OVERHEAD
        if self.held_bytes + size > self.hold_max_bytes:
            self.stats.dropped_hold_full += 1
            return
        entry = self.held.get(cg)
        if entry is None:
            entry = self.held[cg] = Held(line[0])
            self.on_unknown(cg)
        entry.lines.append(line)
        entry.nbytes += size
        self.held_bytes += size
        self.stats.held_lines += 1

    def release(self, now_ns: int, out: list[Enriched], final: bool = False) -> None:
        """Ship held lines whose container is now known; drop those held too long
        (or all that remain, when `final`)."""
        for cg in list(self.held):
            entry = self.held[cg]
            if self._origin(cg) is None:
                if final or now_ns - entry.since_ns > self.hold_timeout_ns:
                    self.stats.dropped_unresolved += len(entry.lines)
                    self._unhold(cg)
                continue
            lines = entry.lines
            self._unhold(cg)
            before = len(out)
            self.process(lines, out)
            shipped = len(out) - before
            self.stats.released_lines += shipped
            self.stats.excluded_lines += len(lines) - shipped

    def _unhold(self, cg: int) -> None:
        entry = self.held.pop(cg)
        self.held_bytes -= entry.nbytes

    @property
    def holding(self) -> bool:
        return bool(self.held)

    def forget(self, cg: int) -> None:
        """The container is gone or its metadata changed: the next line looks it up again."""
        self.origins.pop(cg, None)
