"""The standard point: 10 containers x 1,000 lines/s into a loopback Loki (run as root).

Each container of a simulated node (kubelet-style cgroups, systemd driver: the
writer's stdout is a pipe drained by the node's reader) runs a C writer that
puts its id, a sequence number and its CLOCK_REALTIME write time in every
100-byte line, one line per write().  `podtap run` ships into `LatencyLoki`
(bench/latency_server.py, a process of its own), a FakeLoki that validates pushes as
Loki does and, instead of storing entries, notes each line's receipt time.
Reported: agent CPU (cores), RSS average and max, lines lost, p50/p99/max latency
from write() to the sink's receipt, and the receiver's CPU (`receiver_cores`, not
the agent's).

    python bench/standard_point.py [--seconds 300] [--containers 10] [--rate 1000] [--json]

The writer and the sampling helpers are shared with bench/peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.latency_server import WARMUP_ID, LatencyReceiver, latency_receiver  # noqa: E402
from bench.memory import MIB, measure  # noqa: E402
from bench.tap_throughput import process_cpu_s  # noqa: E402

LINE = 100
# A writer: `writer ID LINES RATE LEN CRI`.  Every line is
#   w<ID> s<SEQ> t<REALTIME_NS> xxxx...\n            (CRI=0: the container's stdout)
#   <RFC3339Nano> stdout F w<ID> s<SEQ> t<NS> xx...\n (CRI=1: as a runtime writes a log file)
# LEN is the length of the application's line, the CRI prefix comes on top of it.
WRITER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    int id = atoi(argv[1]);
    long lines = atol(argv[2]);
    double rate = atof(argv[3]);
    int len = atoi(argv[4]);
    int cri = atoi(argv[5]);
    char buf[70000];
    double start = mono();
    for (long i = 0; i < lines; i++) {
        if (rate > 0) {
            double ahead = start + i / rate - mono();
            if (ahead > 0.0005) {
                struct timespec d = {(time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9)};
                nanosleep(&d, 0);
            }
        }
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        int n = 0;
        if (cri) {
            struct tm tm;
            gmtime_r(&now.tv_sec, &tm);
            n = (int)strftime(buf, 40, "%Y-%m-%dT%H:%M:%S", &tm);
            n += sprintf(buf + n, ".%09ldZ stdout F ", now.tv_nsec);
        }
        int body = sprintf(buf + n, "w%d s%ld t%lld ", id, i,
                           (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
        if (body < len - 1) memset(buf + n + body, 'x', (size_t)(len - 1 - body));
        n += len - 1 > body ? len - 1 : body;
        buf[n++] = '\n';
        char *p = buf;
        while (n > 0) {
            ssize_t w = write(1, p, (size_t)n);
            if (w <= 0) return 1;
            p += w;
            n -= (int)w;
        }
    }
    return 0;
}
"""
def build_writer(tmp: str) -> str:
    src, exe = os.path.join(tmp, "stamped.c"), os.path.join(tmp, "stamped")
    Path(src).write_text(WRITER_C)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


# Longer than the sinks' longest retry backoff (30 s): a batch being retried is not lost.
QUIET_S = 45.0


def drain(book: LatencyReceiver, expected: int, end: float, quiet_s: float = QUIET_S) -> float:
    """Wait for every line, or until none arrived for `quiet_s`; seconds since `end`."""
    last, last_change = -1, time.monotonic()
    while (got := book.unique()) < expected:
        if got != last:
            last, last_change = got, time.monotonic()
        if time.monotonic() - last_change > quiet_s:
            break
        time.sleep(0.05)
    return time.monotonic() - end


LOSS_WORDS = ("drop", "dead", "trunc", "fault", "uncapt", "retries", "miss", "fail")
# What the agent got and what its sinks took in and had acknowledged.
FLOW = ("podtap_lines_total", "podtap_captured_records_total", "podtap_sink_input_records_total",
        "podtap_sink_sent_records_total")


def loss_counters(agent: Any) -> dict[str, float]:
    """The agent's counters of lost, missed or uncaptured data, of resent batches, and of
    the lines it captured and shipped (/metrics; a sink's counters carry its label)."""
    out = {}
    for key, value in agent.metrics().items():
        name = key.split("{", 1)[0]
        if name.startswith("podtap_") and name.endswith("_total") and (
                name in FLOW or any(w in name for w in LOSS_WORDS)):
            out[key] = value
    return out


def counted_losses(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The counters that grew between two snapshots, by how much."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0.0)}


class Sampler(threading.Thread):
    """CPU seconds and RSS of one process, sampled every `period` seconds."""

    def __init__(self, pid: int, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.rss: list[int] = []
        self.rss_without_ring: list[int] = []
        self._halt = threading.Event()
        self.cpu0 = process_cpu_s(pid)
        self.t0 = time.monotonic()
        self.cpu_s = 0.0
        self.elapsed_s = 0.0

    def run(self) -> None:
        while not self._halt.wait(self.period):
            self.sample()

    def sample(self) -> None:
        try:
            mem = measure(self.pid)
        except OSError:
            return
        self.rss.append(mem.rss)
        self.rss_without_ring.append(mem.rss - mem.ring)

    def finish(self) -> dict[str, Any]:
        self.cpu_s = process_cpu_s(self.pid) - self.cpu0
        self.elapsed_s = time.monotonic() - self.t0
        self._halt.set()
        self.join(10)
        self.sample()
        return {
            "cpu_cores": self.cpu_s / self.elapsed_s,
            "rss_avg_mib": sum(self.rss) / len(self.rss) / MIB,
            "rss_max_mib": max(self.rss) / MIB,
            "rss_without_ring_avg_mib": sum(self.rss_without_ring) / len(self.rss) / MIB,
            "rss_without_ring_max_mib": max(self.rss_without_ring) / MIB,
            "rss_series_mib": [round(r / MIB, 2) for r in self.rss],
            "sample_period_s": self.period,
        }


def receiver_cores(receiver: LatencyReceiver, cpu0: float, sampler: Sampler) -> float:
    """The receiver process's CPU in cores over the sampler's span (call after finish())."""
    return (process_cpu_s(receiver.pid) - cpu0) / sampler.elapsed_s


def run(seconds: float = 300, containers: int = 10, rate: int = 1000) -> dict[str, Any]:
    """One standard-point run; returns its figures (JSON-serialisable)."""
    from simnode.agent import AgentRun
    from simnode.node import SimContainerSpec, SimNode

    lines = int(seconds * rate)
    with SimNode() as node, latency_receiver("loki") as loki, \
            tempfile.TemporaryDirectory() as tmp:
        exe = build_writer(tmp)
        agent = AgentRun(node, Path(tmp), sinks={"loki": {"kind": "loki", "url": loki.url}})
        try:
            time.sleep(2)  # settle after start
            losses0 = loss_counters(agent)
            sampler = Sampler(agent.proc.pid)
            loki_cpu0 = process_cpu_s(loki.pid)
            sampler.start()
            pods = [
                node.run_pod("bench", f"std-{i}", [SimContainerSpec(
                    "app", f"exec {exe} {i} {lines} {rate} {LINE} 0")], driver="systemd")
                for i in range(containers)
            ]
            for pod in pods:
                pod.wait(seconds * 2 + 60)
            writers_s = time.monotonic() - sampler.t0
            drain(loki, lines * containers, time.monotonic())
            usage = sampler.finish()
            usage["receiver_cores"] = receiver_cores(loki, loki_cpu0, sampler)
            summary = loki.summary(lines * containers)
            counted = counted_losses(losses0, loss_counters(agent))
        finally:
            stats = agent.stop()
    return {
        "containers": containers,
        "rate_per_container": rate,
        "seconds": seconds,
        "writers_s": writers_s,
        "sink": "loki (loopback), gzip on, default batch (1 s max age)",
        **usage,
        **summary,
        "kernel_drop_records": stats.get("kernel_drop_records"),
        "agent_counted_losses": counted,
    }


def build_static_writer(tmp: str) -> str:
    """The stamped writer linked statically, to run inside a busybox container."""
    src, exe = os.path.join(tmp, "stamped.c"), os.path.join(tmp, "stamped-static")
    Path(src).write_text(WRITER_C)
    subprocess.run(["gcc", "-O2", "-static", "-o", exe, src], check=True)
    return exe


def containerd_ramp(seconds: float = 20, rates: tuple[int, ...] = (10_000, 20_000, 40_000),
                    containers: int = 2) -> dict[str, Any]:
    """`podtap run` on containerd containers (`ctr run`, the shim relaying to `ctr`) writing
    stamped lines at rising total rates into a loopback `_bulk`; stops at the first rate
    with a lost line or a drain longer than 10 s."""
    from simnode.agent import AgentRun
    from simnode.node import SimContainerSpec, SimNode

    rows = []
    with SimNode() as node, latency_receiver("es") as es, tempfile.TemporaryDirectory() as tmp:
        exe = build_static_writer(tmp)
        inside = node.rootfs / "stamped"
        inside.write_bytes(Path(exe).read_bytes())
        inside.chmod(0o755)
        agent = AgentRun(node, Path(tmp), sinks={"es": {"kind": "elasticsearch", "url": es.url}})
        try:
            node.run_pod("bench", "warm", [SimContainerSpec(
                "app", f"exec /stamped {WARMUP_ID} 1 0 {LINE} 0")]).wait(60)
            deadline = time.monotonic() + 60
            while es.warmups < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            for rate in rates:
                es.reset()
                per = rate // containers
                lines = int(per * seconds)
                losses0 = loss_counters(agent)
                sampler = Sampler(agent.proc.pid, 0.5)
                es_cpu0 = process_cpu_s(es.pid)
                sampler.start()
                pods = [node.run_pod("bench", f"ctr-{rate}-{i}", [SimContainerSpec(
                    "app", f"exec /stamped {i} {lines} {per} {LINE} 0")])
                    for i in range(containers)]
                for pod in pods:
                    pod.wait(seconds * 6 + 60)
                writers_s = time.monotonic() - sampler.t0
                lag = drain(es, lines * containers, time.monotonic())
                usage = sampler.finish()
                es_cores = receiver_cores(es, es_cpu0, sampler)
                counted = counted_losses(losses0, loss_counters(agent))
                summary = es.summary(lines * containers)
                summary.pop("latency_quantiles_s")
                sustained = summary["lost"] == 0 and lag <= 10
                rows.append({"rate": rate, "sustained": sustained, "writers_s": writers_s,
                             "agent_counted_losses": counted,
                             "drain_lag_s": lag, "cpu_cores": usage["cpu_cores"],
                             "rss_max_mib": usage["rss_max_mib"], "receiver_cores": es_cores,
                             **summary})
                for pod in pods:
                    node.delete_pod(pod)
                if not sustained:
                    break
        finally:
            agent.stop()
    return {"containers": containers, "seconds": seconds, "rows": rows,
            "sink": "Elasticsearch _bulk (loopback), gzip on"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--containers", type=int, default=10)
    parser.add_argument("--rate", type=int, default=1000, help="lines/s per container")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--containerd", default="",
                        help="instead: the containerd ramp at these total rates (comma-separated)")
    args = parser.parse_args()
    if args.containerd:
        result = containerd_ramp(args.seconds, tuple(map(int, args.containerd.split(","))))
    else:
        result = run(args.seconds, args.containers, args.rate)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"  {key:28s} {value}")


if __name__ == "__main__":
    main()
