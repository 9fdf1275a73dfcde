"""podtap next to rsyslog and syslog-ng on the same lines into the same sink (run as root).

The sink is `LatencyEs` (bench/latency_server.py, a process of its own): a loopback
Elasticsearch `_bulk` that notes the receipt time of every stamped line.  Its CPU is
reported apart (`receiver_cores`), counted for no shipper.  Writers are the stamped C
writer of standard_point.py, 100-byte lines, one line per write(), split over
two writer processes in their own cgroups:

- baseline: the writers write to a pipe drained by a reader, nothing watching;
- rsyslog (Debian package): the writers write CRI-format lines
  (`<RFC3339Nano> stdout F <line>`) themselves into one file each, as a runtime
  does; `imfile` tails the files, `omelasticsearch` (bulk mode) ships them;
- syslog-ng (Debian's, unpacked by scripts/install-bench-deps.sh): the same
  files, `wildcard-file()` source, `http()` destination with `_bulk` bodies;
- podtap: `podtap run` on a simulated node, writers in kubelet-style cgroups
  writing to their stdout pipes, `elasticsearch` sink.

Cost = the shipper's CPU + the writers' extra CPU over the baseline (the file
writes and timestamp formatting for the peers, the probe for podtap), each
taken from the writers' cgroup `cpu.stat`.  gzip is off for every shipper
(neither peer build here compresses).  The peers ship the raw CRI line without
parsing or Kubernetes metadata; podtap's records are enriched.

    python bench/peers.py [--seconds 20] [--rates 10000,20000,40000,80000] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.latency_server import WARMUP_ID, LatencyReceiver, latency_receiver  # noqa: E402
from bench.standard_point import (  # noqa: E402
    LINE,
    Sampler,
    build_writer,
    counted_losses,
    drain,
    loss_counters,
)
from bench.tap_throughput import process_cpu_s  # noqa: E402
from simnode.containers import CgroupSandbox, Container  # noqa: E402
from simnode.node import stop_process  # noqa: E402

SYSLOG_NG_ROOT = Path(os.environ.get("SYSLOG_NG_ROOT", "/opt/podtap-bench/syslog-ng"))
WRITERS = 2
SUSTAIN_LAG_S = 10.0  # every line must be at the sink this long after the writers end
SHIPPERS = ("rsyslog", "syslog-ng", "podtap")


def cgroup_cpu_s(path: Path) -> float:
    for line in (path / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec"):
            return int(line.split()[1]) / 1e6
    return 0.0


@dataclass
class Step:
    """What one shipper did at one rate."""

    shipper: str
    rate: int
    seconds: float
    shipper_cpu_s: float
    writer_cpu_s: float
    rss_max_mib: float
    drain_lag_s: float
    summary: dict[str, Any]
    receiver_cpu_s: float  # the sink's, counted apart from the shipper's

    @property
    def sustained(self) -> bool:
        return self.summary["lost"] == 0 and self.drain_lag_s <= SUSTAIN_LAG_S

    def row(self, baseline_writer_cpu_s: float) -> dict[str, Any]:
        extra = max(0.0, self.writer_cpu_s - baseline_writer_cpu_s)
        return {
            "shipper": self.shipper, "rate": self.rate, "sustained": self.sustained,
            "shipper_cores": self.shipper_cpu_s / self.seconds,
            "writer_extra_cores": extra / self.seconds,
            "total_cores": (self.shipper_cpu_s + extra) / self.seconds,
            "rss_max_mib": self.rss_max_mib, "drain_lag_s": self.drain_lag_s,
            "receiver_cores": self.receiver_cpu_s / self.seconds,
            **self.summary,
        }


def wait_until(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {why}")


# --- peers -----------------------------------------------------------------------------


def rsyslog_conf(work: Path, logs: Path, port: int) -> str:
    return f"""
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imfile" mode="inotify")
module(load="omelasticsearch")
template(name="doc" type="list" option.jsonf="on") {{
  property(outname="message" name="msg" format="jsonf")
  property(outname="file" name="$!metadata!filename" format="jsonf")
}}
input(type="imfile" file="{logs}/*.log" tag="cri" addMetadata="on" ruleset="ship")
ruleset(name="ship" queue.type="linkedList" queue.size="200000") {{
  action(type="omelasticsearch" server="127.0.0.1" serverport="{port}" template="doc"
         searchIndex="logs-rsyslog" bulkmode="on" maxbytes="1m"
         queue.type="linkedList" queue.size="200000" queue.dequeueBatchSize="1024"
         action.resumeRetryCount="-1")
}}
"""


def syslog_ng_conf(logs: Path, port: int) -> str:
    return f"""@version: 3.38
options {{ log-msg-size(65536); log-fifo-size(200000); stats-freq(0); }};
source s_cri {{
  wildcard-file(base-dir("{logs}") filename-pattern("*.log") flags(no-parse)
                max-files(64) log-iw-size(20000) log-fetch-limit(1000));
}};
destination d_es {{
  http(url("http://127.0.0.1:{port}/logs-syslog-ng/_bulk") method("POST")
       headers("Content-Type: application/x-ndjson")
       body("{{\\"index\\":{{}}}}\\n$(format-json message=$MESSAGE file=$FILE_NAME)")
       body-suffix("\\n") delimiter("\\n")
       batch-lines(1000) batch-bytes(1048576) batch-timeout(1000) workers(2));
}};
log {{ source(s_cri); destination(d_es); }};
"""


@contextlib.contextmanager
def peer_process(name: str, work: Path, logs: Path, port: int) -> Iterator[int]:
    """Start a peer shipper on `logs/*.log` -> `port`; yield its pid."""
    if name == "rsyslog":
        conf = work / "rsyslog.conf"
        conf.write_text(rsyslog_conf(work, logs, port))
        argv = ["rsyslogd", "-n", "-f", str(conf), "-i", str(work / "rsyslog.pid")]
        env = dict(os.environ)
    else:
        conf = work / "syslog-ng.conf"
        conf.write_text(syslog_ng_conf(logs, port))
        lib = SYSLOG_NG_ROOT / "usr/lib/syslog-ng"
        argv = [str(SYSLOG_NG_ROOT / "usr/sbin/syslog-ng"), "-F", "-f", str(conf),
                f"--module-path={lib}/3.38", f"--persist-file={work}/syslog-ng.persist",
                f"--pidfile={work}/syslog-ng.pid", f"--control={work}/syslog-ng.ctl"]
        env = {**os.environ, "LD_LIBRARY_PATH": str(lib)}
    log = (work / f"{name}.out").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc.pid
    finally:
        stop_process(proc, signal.SIGTERM, 20)
        log.close()
        if proc.returncode not in (0, -signal.SIGTERM):
            tail = (work / f"{name}.out").read_text(errors="replace")[-1500:]
            print(f"  {name} exited {proc.returncode}: {tail}", file=sys.stderr)


def writers_into(box: CgroupSandbox, exe: str, rate: int, seconds: float, files: Path | None,
                 tag: str) -> tuple[list[Container], list[subprocess.Popen[bytes]]]:
    """WRITERS stamped writers in their own cgroups; to files (CRI) or to their stdout pipes."""
    per = rate // WRITERS
    lines = int(per * seconds)
    containers, procs = [], []
    for i in range(WRITERS):
        c = box.container(f"{tag}-{i}")
        if files is None:
            argv = [exe, str(i), str(lines), str(per), str(LINE), "0"]
        else:
            argv = ["/bin/sh", "-c",
                    f"exec {exe} {i} {lines} {per} {LINE} 1 >> {files}/{tag}-{i}.log"]
        containers.append(c)
        procs.append(c.spawn(argv))
    return containers, procs


def finish_writers(containers: list[Container], procs: list[subprocess.Popen[bytes]]) -> float:
    for proc in procs:
        if proc.wait(600) != 0:
            raise RuntimeError(f"a writer failed ({proc.returncode})")
    cpu = sum(cgroup_cpu_s(c.path) for c in containers)
    for c in containers:
        c.finish()
    return cpu


def baseline_step(box: CgroupSandbox, exe: str, rate: int, seconds: float) -> float:
    """The writers' CPU seconds at `rate` with nothing watching, into a drained pipe."""
    containers, procs = writers_into(box, exe, rate, seconds, None, f"base-{rate}")
    return finish_writers(containers, procs)


def peer_step(name: str, box: CgroupSandbox, exe: str, rate: int, seconds: float,
              es: LatencyReceiver, tmp: Path) -> Step:
    work = tmp / f"{name}-{rate}"
    logs = work / "logs"
    logs.mkdir(parents=True)
    with peer_process(name, work, logs, es.port) as pid:
        warm = box.container(f"{name}-{rate}-warm")
        warm.spawn(["/bin/sh", "-c", f"exec {exe} {WARMUP_ID} 1 0 {LINE} 1 >> {logs}/warm.log"])
        wait_until(lambda: es.warmups >= 1, 60, f"{name} shipping its first line")
        es.reset()
        sampler = Sampler(pid, 0.5)
        es_cpu0 = process_cpu_s(es.pid)
        sampler.start()
        containers, procs = writers_into(box, exe, rate, seconds, logs, f"{name}-{rate}")
        writer_cpu = finish_writers(containers, procs)
        end = time.monotonic()
        expected = (rate // WRITERS) * int(seconds) * WRITERS
        lag = drain(es, expected, end)
        sampler.finish()
        es_cpu = process_cpu_s(es.pid) - es_cpu0
    shutil.rmtree(work, ignore_errors=True)
    return Step(name, rate, seconds, sampler.cpu_s, writer_cpu,
                max(sampler.rss) / 2**20, lag, es.summary(expected), es_cpu)


def podtap_step(exe: str, rate: int, seconds: float, es: LatencyReceiver, tmp: Path) -> Step:
    from simnode.agent import AgentRun
    from simnode.node import SimContainerSpec, SimNode

    per = rate // WRITERS
    lines = int(per * seconds)
    work = tmp / f"podtap-{rate}"
    work.mkdir()
    with SimNode() as node:
        agent = AgentRun(node, work, sinks={"es": {"kind": "elasticsearch", "url": es.url,
                                                   "gzip": False}})
        try:
            node.run_pod("bench", "warm", [SimContainerSpec(
                "app", f"exec {exe} {WARMUP_ID} 1 0 {LINE} 0")], driver="systemd").wait(60)
            wait_until(lambda: es.warmups >= 1, 60, "podtap shipping its first line")
            es.reset()
            losses0 = loss_counters(agent)
            sampler = Sampler(agent.proc.pid, 0.5)
            es_cpu0 = process_cpu_s(es.pid)
            sampler.start()
            pods = [node.run_pod("bench", f"w-{i}", [SimContainerSpec(
                "app", f"exec {exe} {i} {lines} {per} {LINE} 0")], driver="systemd")
                for i in range(WRITERS)]
            for pod in pods:
                pod.wait(seconds * 4 + 60)
            writer_cpu = sum(cgroup_cpu_s(p.containers[0].cgroup_path) for p in pods)
            end = time.monotonic()
            lag = drain(es, lines * WRITERS, end)
            sampler.finish()
            es_cpu = process_cpu_s(es.pid) - es_cpu0
            counted = counted_losses(losses0, loss_counters(agent))
        finally:
            agent.stop()
    summary = {**es.summary(lines * WRITERS), "agent_counted_losses": counted}
    return Step("podtap", rate, seconds, sampler.cpu_s, writer_cpu,
                max(sampler.rss) / 2**20, lag, summary, es_cpu)


def run(seconds: float = 20, rates: tuple[int, ...] = (10_000, 20_000, 40_000, 80_000),
        shippers: tuple[str, ...] = SHIPPERS) -> dict[str, Any]:
    """The ramp for each shipper (stops at its first rate not sustained)."""
    rows: list[dict[str, Any]] = []
    box = CgroupSandbox(prefix="podtap-bench")
    try:
        with latency_receiver("es") as es, tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            exe = build_writer(tmp_name)
            baseline = {rate: baseline_step(box, exe, rate, seconds) for rate in rates}
            for shipper in shippers:
                for rate in rates:
                    if shipper == "podtap":
                        step = podtap_step(exe, rate, seconds, es, tmp)
                    else:
                        step = peer_step(shipper, box, exe, rate, seconds, es, tmp)
                    rows.append(step.row(baseline[rate]))
                    print(f"  {shipper} at {rate:,} lines/s: "
                          f"{'sustained' if step.sustained else 'NOT sustained'}", file=sys.stderr)
                    if not step.sustained:
                        break
    finally:
        box.cleanup()
    return {"seconds": seconds, "writers": WRITERS, "line_bytes": LINE,
            "sink": "Elasticsearch _bulk (loopback), gzip off", "rows": rows,
            "baseline_writer_cores": {str(r): cpu / seconds for r, cpu in baseline.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rates", default="10000,20000,40000,80000")
    parser.add_argument("--shippers", default=",".join(SHIPPERS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.seconds, tuple(int(r) for r in args.rates.split(",")),
                 tuple(args.shippers.split(",")))
    if args.json:
        print(json.dumps(result))
        return
    for row in result["rows"]:
        print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()))


if __name__ == "__main__":
    main()
