"""podtap run with many watched containers: memory, kubelet sync time, idle CPU (run as root).

A simulated node runs N idle pods (kubelet-style cgroups, one `sleep` each),
all listed by the loopback kubelet, before `podtap run` starts.  Measured for
N = 0 and N = 1,000 (by default):
- kubelet sync: from the agent's last log line before its first /pods request
  to "capturing: N containers known" (the agent's own log timestamps, 1 ms):
  the request, the parse of N pods and N entries written into the kernel map;
- idle CPU: the agent's CPU over a window with nothing written, polling the
  kubelet every `kube.poll_interval_s` (10 s, the default);
- RSS (VmRSS, and without the ring buffer's mapping) at the end of that window.

    python bench/scale.py [--containers 1000] [--idle-seconds 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory import MIB, measure  # noqa: E402
from bench.tap_throughput import process_cpu_s  # noqa: E402

BEFORE_POLL = "own cgroup"  # the agent logs this just before it asks the kubelet


def log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()


def one_size(containers: int, idle_s: float) -> dict[str, Any]:
    from simnode.agent import AgentRun
    from simnode.node import SimContainerSpec, SimNode

    with SimNode() as node, tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        for i in range(containers):
            node.run_pod("scale", f"idle-{i}", [SimContainerSpec("app", "exec sleep 3600")],
                         driver="systemd")
        start_pods_s = time.monotonic() - t0
        t0 = time.monotonic()
        agent = AgentRun(node, Path(tmp), kube={"poll_interval_s": 10.0})
        try:
            started_s = time.monotonic() - t0
            capturing = agent.log_records(f"capturing: {containers} containers known")
            if not capturing:
                raise RuntimeError(f"the agent did not know all {containers} containers at "
                                   "start:\n" + agent.logs())
            before = [rec for msg in _messages(agent) for rec in agent.log_records(msg)]
            sync_s = log_time(capturing[0]) - log_time(before[0]) if before else None
            time.sleep(2)
            cpu0, w0 = process_cpu_s(agent.proc.pid), time.monotonic()
            time.sleep(idle_s)
            idle_cores = (process_cpu_s(agent.proc.pid) - cpu0) / (time.monotonic() - w0)
            mem = measure(agent.proc.pid)
            polls = agent.metric("podtap_kubelet_polls_total")
        finally:
            agent.stop(120)
    return {
        "containers": containers,
        "kubelet_sync_s": sync_s,
        "agent_start_s": started_s,
        "idle_cores": idle_cores,
        "rss_mib": mem.rss / MIB,
        "rss_without_ring_mib": (mem.rss - mem.ring) / MIB,
        "kubelet_polls": polls,
        "pods_start_s": start_pods_s,
    }


def _messages(agent: Any) -> list[str]:
    """The exact messages of the agent's log lines that start with BEFORE_POLL."""
    out = []
    for line in list(agent.log):
        if f'"msg":"{BEFORE_POLL}' in line:
            out.append(json.loads(line)["msg"])
    return out


def run(containers: int = 1000, idle_s: float = 30) -> dict[str, Any]:
    return {"sizes": [one_size(0, idle_s), one_size(containers, idle_s)],
            "poll_interval_s": 10.0, "idle_seconds": idle_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.containers, args.idle_seconds)
    if args.json:
        print(json.dumps(result))
        return
    for size in result["sizes"]:
        print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in size.items()))


if __name__ == "__main__":
    main()
