"""Prometheus text exposition format 0.0.4, rendered by hand.

The agent exports a few dozen families made at scrape time; a renderer of its own
spares the agent's process prometheus_client (its import costs about 1 MiB of RSS on
every node). Names, HELP texts, types and samples are the ones prometheus_client
rendered before; tests compare both pages through prometheus_client's own parser.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Floats with an integral value below this are written as integers: exact, and short.
_EXACT_INT = 2.0**53


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: `+Inf`, `-Inf`, `NaN`, integers as
    integers (no `1e+07`), other floats in their shortest round-trip form."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INT:
        # -0.0 keeps its sign: parsers read "-0" as the integer 0.
        return "-0.0" if math.copysign(1.0, value) < 0 and not value else str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass(slots=True)
class Family:
    """One metric family: `name` is the exposed name (a counter's ends in `_total`),
    `labels` the label names every sample carries, in order."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    doc: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # name, labels, value

    def add(self, values: Sequence[str], value: float) -> None:
        self.samples.append((self.name, self._labelset(values), value))

    def add_histogram(
        self, values: Sequence[str], buckets: Iterable[tuple[str, float]], total: float
    ) -> None:
        """`buckets` are (le, cumulative count), the last one `+Inf`; `_count` is its count."""
        count: float = 0
        for le, count in buckets:
            self.samples.append((self.name + "_bucket", self._labelset(values, le), count))
        self.samples.append((self.name + "_count", self._labelset(values), count))
        self.samples.append((self.name + "_sum", self._labelset(values), total))

    def _labelset(self, values: Sequence[str], le: str | None = None) -> str:
        pairs = [f'{k}="{escape_label_value(v)}"' for k, v in zip(self.labels, values,
                                                                  strict=True)]
        if le is not None:
            pairs.append(f'le="{le}"')
        return "{" + ",".join(pairs) + "}" if pairs else ""


def counter(name: str, doc: str, value: float | None = None,
            labels: tuple[str, ...] = ()) -> Family:
    """A counter family; `name` without `_total`."""
    family = Family(name + "_total", "counter", doc, labels)
    if value is not None:
        family.add((), value)
    return family


def gauge(name: str, doc: str, value: float | None = None,
          labels: tuple[str, ...] = ()) -> Family:
    family = Family(name, "gauge", doc, labels)
    if value is not None:
        family.add((), value)
    return family


def render(families: Iterable[Family]) -> bytes:
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {escape_help(f.doc)}\n# TYPE {f.name} {f.kind}\n")
        out.extend(f"{name}{labels} {format_value(value)}\n" for name, labels, value in f.samples)
    return "".join(out).encode()


class ProcessMetrics:
    """The `process_*` families prometheus_client's ProcessCollector made, from /proc."""

    def __init__(self, proc: str = "/proc") -> None:
        self.self_dir = os.path.join(proc, "self")
        self.ticks = float(os.sysconf("SC_CLK_TCK"))
        self.pagesize = os.sysconf("SC_PAGE_SIZE")
        self.boot_time = boot_time(proc)

    def families(self) -> list[Family]:
        if not self.boot_time:
            return []
        out: list[Family] = []
        try:
            with open(os.path.join(self.self_dir, "stat"), "rb") as f:
                # After the command name in parentheses: fields 3.. of proc_pid_stat(5).
                parts = f.read().rsplit(b")", 1)[-1].split()
            out += [
                gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                      float(parts[20])),
                gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
                      float(parts[21]) * self.pagesize),
                gauge("process_start_time_seconds",
                      "Start time of the process since unix epoch in seconds.",
                      float(parts[19]) / self.ticks + self.boot_time),
                counter("process_cpu_seconds", "Total user and system CPU time spent in seconds.",
                        float(parts[11]) / self.ticks + float(parts[12]) / self.ticks),
            ]
        except (OSError, IndexError, ValueError):
            pass
        try:
            open_fds = len(os.listdir(os.path.join(self.self_dir, "fd")))
            max_fds = max_open_files(os.path.join(self.self_dir, "limits"))
            out.append(gauge("process_open_fds", "Number of open file descriptors.", open_fds))
            if max_fds is not None:
                out.append(gauge("process_max_fds", "Maximum number of open file descriptors.",
                                 max_fds))
        except OSError:
            pass
        return out


def boot_time(proc: str) -> float:
    try:
        with open(os.path.join(proc, "stat"), "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def max_open_files(limits_path: str) -> float | None:
    """The soft limit ("unlimited" is +Inf)."""
    with open(limits_path, "rb") as f:
        for line in f:
            if line.startswith(b"Max open files"):
                soft = line.split()[3]
                return math.inf if soft == b"unlimited" else float(soft)
    return None
