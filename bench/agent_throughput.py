"""`podtap run` end to end into its stdout sink and a loopback Loki and Elasticsearch `_bulk`
(run as root).

For each sink kind and gzip on/off, one agent runs against a loopback kubelet; writer
processes (the paced C writer of tap_throughput.py, 100-byte lines, one line per write())
sit in kubelet-style cgroups (`kubepods.slice/.../cri-containerd-<id>.scope`) whose stdout
pipes are drained by `cat`.  Rates rise until one is not held.  A rate is held when every
line reached the backend within a few seconds of the writers' end and nothing was dropped
on the way (kernel ring buffer, hold buffer, sink buffers, dead letters, retries).

Per rate: the agent's CPU in cores (CPU seconds from the writers' start until the last line
was acknowledged, over the writers' duration) and its peak RSS without the ring buffer's
mapping (VmRSS minus the ring, as bench/memory.py splits it).  Idle RSS before the first
rate.  The backend is a counting receiver in its own process: it decompresses and parses
every push (Loki JSON, `_bulk` NDJSON) and answers as the real server does, so that its
cost does not starve the agent on a 2-core machine.  The stdout sink (the agent's stdout is
/dev/null: the issue's "podtap run with the stdout sink") counts by the agent's own
`podtap_sink_sent_records_total`; gzip does not apply to it.

    python bench/agent_throughput.py [--smoke] [--seconds N] [--writers N]
        [--line-bytes N] [--sinks stdout,loki,elasticsearch] [--gzip on,off]
        [--rates 10000,50000,...] [--env NAME=VALUE]... [--sink YAML] [--prelude PYTHON]
        [--tree DIR] [--json] [--profile SECONDS]

--smoke: the stdout sink and Loki with gzip at 10K lines/s for 3 s (< 60 s in all, for CI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory import Memory, measure  # noqa: E402
from bench.profile import AgentProfile  # noqa: E402
from bench.tap_throughput import build_writer, process_cpu_s  # noqa: E402
from bench.write_cost import Stream  # noqa: E402
from simnode.containers import CgroupSandbox  # noqa: E402
from simnode.kubelet import FakeKubelet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
LINE = 100  # bytes per line, newline included (--line-bytes)
RATES = (10_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000)
TRACE = "--trace" in sys.argv  # print the sink's counters while the writers run
PROFILE_DELAY_S = 3.0  # --profile starts this long after the writers (past the ramp-up)
DRAIN_S = 5.0  # after the writers, every line must be acknowledged within this long
IDLE_S = 3.0  # the idle agent's CPU and RSS are measured over this long

# The counting backend: Loki push and Elasticsearch _bulk, in its own process.
BACKEND = r"""
import sys, orjson
from aiohttp import web
count = 0
requests = 0
async def loki(request):
    global count, requests
    body = await request.read()  # aiohttp decompresses Content-Encoding gzip
    doc = orjson.loads(body)
    count += sum(len(s["values"]) for s in doc["streams"])
    requests += 1
    return web.Response(status=204)
async def bulk(request):
    global count, requests
    body = await request.read()  # aiohttp decompresses Content-Encoding gzip
    n = body.count(b"\n") // 2
    count += n
    requests += 1
    items = b",".join([b'{"create":{"status":201}}'] * n)
    return web.Response(body=b'{"errors":false,"items":[' + items + b"]}",
                        content_type="application/json")
async def counted(request):
    return web.json_response({"count": count, "requests": requests})
app = web.Application(client_max_size=256 << 20)
app.add_routes([web.post("/loki/api/v1/push", loki), web.post("/{index}/_bulk", bulk),
                web.post("/_bulk", bulk), web.get("/count", counted), web.get("/ready", counted)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]),
            print=lambda *a: print("ready", flush=True))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Backend:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", BACKEND, str(self.port)],
                                     stdout=subprocess.PIPE, cwd=REPO)
        assert self.proc.stdout is not None
        if b"ready" not in self.proc.stdout.readline():
            raise SystemExit("the counting backend did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self) -> int:
        with urllib.request.urlopen(self.url + "/count", timeout=10) as resp:
            return int(orjson.loads(resp.read())["count"])

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)


class SentByAgent:
    """The stdout sink's 'backend': the agent's own count of records written."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.proc = agent.proc  # its CPU is the agent's: reported as the backend's too

    def count(self) -> int:
        return int(self.agent.metrics().get('podtap_sink_sent_records_total{sink="bench"}', 0))


@dataclass
class Writer:
    """One kubelet-style container: cgroup, pod in the kubelet, stdout drained by `cat`."""

    uid: str
    cid: str
    stream: Stream


def add_writers(box: CgroupSandbox, kubelet: FakeKubelet, n: int) -> list[Writer]:
    writers = []
    for i in range(n):
        uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        escaped = uid.replace("-", "_")
        path = (box.root / "kubepods.slice" / "kubepods-besteffort.slice"
                / f"kubepods-besteffort-pod{escaped}.slice" / f"cri-containerd-{cid}.scope")
        path.mkdir(parents=True)
        kubelet.add_pod("bench", f"writer-{i}", uid=uid,
                        containers=[("writer", "bench/writer:1", f"containerd://{cid}")],
                        labels={"app.kubernetes.io/name": "writer"})
        writers.append(Writer(uid, cid, Stream(path)))
    return writers


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def losses(self) -> dict[str, float]:
        """Everything that counts a line lost or sent twice, summed by kind."""
        m = self.metrics()
        kinds = {
            "kernel": r"podtap_ringbuf_dropped_\w*records_total",
            "hold": r"podtap_hold_dropped_lines_total",
            "sink_dropped": r"podtap_sink_dropped_records_total",
            "dead": r"podtap_sink_dead_letter_records_total",
            "retries": r"podtap_sink_retries_total",
            "encode": r"podtap_sink_encode_errors_total",
        }
        return {k: sum(v for n, v in m.items() if re.match(p, n)) for k, p in kinds.items()}


def start_agent(tmp: Path, box: CgroupSandbox, kubelet: FakeKubelet, token: Path,
                sink: dict[str, Any], env: dict[str, str], tree: Path, prelude: str = ""
                ) -> Agent:
    cfg = {
        "kube": {"kubelet_url": kubelet.url, "token_path": str(token),
                 "ca_path": kubelet.ca_path, "cgroup_roots": [box.root.name],
                 "node_name": kubelet.node_name, "poll_interval_s": 10.0},
        "telemetry": {"address": "127.0.0.1", "port": 0},
        "sinks": {"bench": sink},
    }
    path = tmp / "podtap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / "agent.log"
    command = ["-m", "agent.cli", "run", "-c", str(path)]
    if prelude:  # Python run in the agent's process before the CLI (a GC setting, say)
        command = ["-c", prelude + "\nimport runpy, sys\n"
                   f"sys.argv = ['podtap', 'run', '-c', {str(path)!r}]\n"
                   "runpy.run_module('agent.cli', run_name='__main__')"]
    proc = subprocess.Popen([sys.executable, *command],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"), cwd=tree,
                            env={**os.environ, **env})
    agent = Agent(proc, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if agent.port == 0 and (m := re.search(r'"msg":"telemetry listening".*?"port":(\d+)',
                                                text)):
            agent.port = int(m.group(1))
        if "capturing:" in text and agent.port:
            return agent
        if proc.poll() is not None:
            raise SystemExit("the agent exited:\n" + text[-3000:])
        time.sleep(0.1)
    raise SystemExit("the agent did not start:\n" + log.read_text()[-3000:])


def stop_agent(agent: Agent) -> None:
    agent.proc.send_signal(signal.SIGTERM)
    agent.proc.wait(120)


@dataclass
class Case:
    rate: int
    held: bool = False
    cores: float = 0.0
    rss: Memory = field(default_factory=Memory)
    lost: int = 0
    drained_s: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    backend_cores: float = 0.0
    machine_busy: float = 0.0  # of all CPUs, while the writers ran
    profile: dict[str, Any] = field(default_factory=dict)  # bench/profile.py's, --profile

    def row(self, kind: str, gzip: bool, line_bytes: int) -> dict[str, Any]:
        return {"sink": kind, "gzip": "n/a" if kind == "stdout" else "on" if gzip else "off",
                "line B": line_bytes, "lines/s": self.rate, "held": self.held,
                "agent cores": round(self.cores, 3),
                "RSS w/o ring max MiB": round((self.rss.rss - self.rss.ring) / MIB, 1),
                "acked after the writers s": round(self.drained_s, 1), "missing": self.lost,
                "machine busy %": round(100 * self.machine_busy),
                "counted losses": ", ".join(f"{k} {int(v):,}" for k, v in self.losses.items()
                                            if v) or "none",
                **({"profile": self.profile} if self.profile else {})}

    def line(self) -> str:
        verdict = "held" if self.held else "NOT held"
        bad = {k: int(v) for k, v in self.losses.items() if v}
        return (f"    {self.rate:>8,} lines/s: {verdict:8} | agent {self.cores:5.3f} cores"
                f" | RSS w/o ring {(self.rss.rss - self.rss.ring) / MIB:5.1f} MiB (peak)"
                f" | all acked {self.drained_s:4.1f} s after the writers"
                f" | missing {self.lost} | backend {self.backend_cores:4.2f} cores"
                f" | machine {100 * self.machine_busy:3.0f}% busy"
                + (f" | counted losses {bad}" if bad else "") + self.profile_lines())

    def profile_lines(self) -> str:
        p = self.profile
        if not p:
            return ""
        if "error" in p:
            return f"\n      profile: {p['error']}"
        threads = ", ".join(f"{name} {cores:.3f}" for name, cores in p["threads"].items())
        stages = ", ".join(f"{stage} {100 * share:.0f}%" for stage, share in p["stages"].items()
                           if share >= 0.005)
        return (f"\n      threads (cores): {threads}"
                f"\n      GIL held {p['gil_cores']:.3f} cores, by stage: {stages}")


def trace(agent: Agent, t: float) -> None:
    m = agent.metrics()
    sink = '{sink="bench"}'
    print(f"      t={t:5.2f} captured={m.get('podtap_captured_records_total', 0):.0f}"
          f" lines={m.get('podtap_lines_total', 0):.0f}"
          f" in={m.get('podtap_sink_input_records_total' + sink, 0):.0f}"
          f" sent={m.get('podtap_sink_sent_records_total' + sink, 0):.0f}"
          f" mem={m.get('podtap_sink_buffered_memory_bytes' + sink, 0):.0f}"
          f" sends={m.get('podtap_sink_send_latency_seconds_count' + sink, 0):.0f}"
          f" send_s={m.get('podtap_sink_send_latency_seconds_sum' + sink, 0):.3f}", flush=True)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def run_rate(agent: Agent, backend: Backend | SentByAgent, exe: str, writers: list[Writer],
             rate: int, seconds: float, line_bytes: int = LINE, profile_s: float = 0.0) -> Case:
    """One rate; with `profile_s`, the agent is also profiled (bench/profile.py) for that
    long, from PROFILE_DELAY_S after the writers start (the profiler's cost is in `cores`)."""
    case = Case(rate)
    per_writer = rate // len(writers)
    lines = int(per_writer * seconds)
    total = lines * len(writers)
    before, losses0 = backend.count(), agent.losses()
    cpu0, backend0 = process_cpu_s(agent.proc.pid), process_cpu_s(backend.proc.pid)
    busy0 = machine_ticks()
    t0 = time.monotonic()
    procs = [w.stream.spawn([exe, str(lines), "1", str(line_bytes), str(per_writer)])
             for w in writers]
    samples = []
    with contextlib.ExitStack() as stack:
        if profile_s:
            profile = stack.enter_context(AgentProfile(agent.proc.pid, profile_s,
                                                       PROFILE_DELAY_S))
        while any(p.poll() is None for p in procs):
            samples.append(measure(agent.proc.pid))
            if TRACE:
                trace(agent, time.monotonic() - t0)
            time.sleep(0.25)
        t_writers = time.monotonic() - t0
    if profile_s:
        case.profile = profile.result
    busy1 = machine_ticks()
    case.machine_busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1)
    deadline = time.monotonic() + DRAIN_S + seconds  # a backlog still drains, but too late
    got = backend.count() - before
    while got < total and time.monotonic() < deadline and agent.proc.poll() is None:
        samples.append(measure(agent.proc.pid))
        time.sleep(0.05)
        got = backend.count() - before
    t_done = time.monotonic() - t0
    cpu = process_cpu_s(agent.proc.pid) - cpu0
    case.cores = cpu / t_writers
    if isinstance(backend, Backend):
        case.backend_cores = (process_cpu_s(backend.proc.pid) - backend0) / t_writers
    case.rss = max(samples, key=lambda m: m.rss - m.ring)
    case.lost = total - got
    case.drained_s = t_done - t_writers
    losses1 = agent.losses()
    case.losses = {k: losses1[k] - losses0[k] for k in losses1}
    case.held = (got == total and not any(case.losses.values())
                 and case.drained_s <= DRAIN_S and t_writers < seconds * 1.2)
    return case


def run_config(tmp: Path, box: CgroupSandbox, kubelet: FakeKubelet, token: Path,
               backend: Backend, exe: str, writers: list[Writer], kind: str, gzip: bool,
               rates: tuple[int, ...], seconds: float, env: dict[str, str], tree: Path,
               extra: dict[str, Any], prelude: str, line_bytes: int = LINE,
               profile_s: float = 0.0) -> list[Case]:
    sink = ({"kind": kind, **extra} if kind == "stdout"
            else {"kind": kind, "url": backend.url, "gzip": gzip, **extra})
    agent = start_agent(tmp, box, kubelet, token, sink, env, tree, prelude)
    counter: Backend | SentByAgent = SentByAgent(agent) if kind == "stdout" else backend
    try:
        time.sleep(1)
        cpu0 = process_cpu_s(agent.proc.pid)
        time.sleep(IDLE_S)
        idle_cores = (process_cpu_s(agent.proc.pid) - cpu0) / IDLE_S
        idle = measure(agent.proc.pid)
        label = "" if kind == "stdout" else f", gzip {'on' if gzip else 'off'}"
        print(f"  {kind}{label}: idle {idle_cores:5.3f} cores,"
              f" {idle.line()}", flush=True)
        cases = []
        for rate in rates:
            case = run_rate(agent, counter, exe, writers, rate, seconds, line_bytes, profile_s)
            print(case.line(), flush=True)
            cases.append(case)
            if not case.held:
                break
            time.sleep(1)
        held = [c.rate for c in cases if c.held]
        print(f"    => highest rate held: {max(held):,} lines/s" if held
              else "    => no rate held", flush=True)
        print(f"    busy peak: {max((c.rss for c in cases), key=lambda m: m.rss - m.ring).line()}",
              flush=True)
        return cases
    finally:
        stop_agent(agent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--line-bytes", type=int, default=LINE,
                        help="bytes per line, newline included (one line per write())")
    parser.add_argument("--sinks", default="stdout,loki,elasticsearch")
    parser.add_argument("--json", action="store_true",
                        help="print every rate's figures as one JSON object at the end")
    parser.add_argument("--gzip", default="on,off")
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--sink", default="{}",
                        help='more sink options, as YAML: "{max_in_flight: 4}"')
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="profile the agent (py-spy, threads' CPU) this long at each rate")
    parser.add_argument("--prelude", default="",
                        help='Python run in the agent first: "import gc; gc.freeze()"')
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="run the agent of another checkout (as bench/memory.py --tree)")
    parser.add_argument("--env", action="append", default=[],
                        help="NAME=VALUE for the agent's environment (e.g. MALLOC_ARENA_MAX=2)")
    args = parser.parse_args()
    sinks, gzips = args.sinks.split(","), [g == "on" for g in args.gzip.split(",")]
    rates = tuple(int(r) for r in args.rates.split(","))
    seconds = args.seconds
    if args.smoke:
        sinks, gzips, rates, seconds = ["stdout", "loki"], [True], (10_000,), 3.0
    env = dict(e.split("=", 1) for e in args.env)
    extra = yaml.safe_load(args.sink)
    box = CgroupSandbox(prefix="podtap-bench")
    backend = Backend()
    writers: list[Writer] = []
    try:
        with tempfile.TemporaryDirectory() as tmpdir, FakeKubelet() as kubelet:
            tmp = Path(tmpdir)
            token = tmp / "token"
            token.write_text(kubelet.token or "")
            exe = build_writer(tmpdir)
            writers = add_writers(box, kubelet, args.writers)
            print(f"podtap run, {args.line_bytes}-byte lines, 1 line/write, {args.writers} "
                  f"writers, {seconds:g} s per rate, kernel {os.uname().release}, "
                  f"{os.cpu_count()} CPUs, "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
            failed, rows = False, []
            for kind in sinks:
                for gz in ([False] if kind == "stdout" else gzips):
                    cases = run_config(tmp, box, kubelet, token, backend, exe, writers, kind,
                                       gz, rates, seconds, env, args.tree, extra,
                                       args.prelude, args.line_bytes, args.profile)
                    failed |= not cases[0].held
                    rows += [c.row(kind, gz, args.line_bytes) for c in cases]
            if args.json:
                print(json.dumps({"writers": args.writers, "seconds": seconds, "rows": rows}))
            if args.smoke and failed:
                raise SystemExit("smoke: 10K lines/s was not held")
    finally:
        for w in writers:
            w.stream.close()
        backend.close()
        box.cleanup()


if __name__ == "__main__":
    main()
