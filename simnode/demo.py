"""`make demo`: podtap on a simulated node, end to end.

A SimNode runs real containerd/runc containers (and systemd-layout cgroups)
with a loopback kubelet; `podtap run` captures them with the real BPF program
and prints enriched records.  Shown: a web pod (stdout and stderr), a job in
the systemd layout, a 200 ms pod the kubelet lists only after it exited, and
an excluded pod that is never copied out of the kernel.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from simnode.agent import AgentRun, joined
from simnode.node import SimContainerSpec, SimNode, SimPod, simnode_unavailable_reason


def say(text: str = "") -> None:
    print(text, flush=True)


def lines(n: int, text: str, err: bool = False) -> str:
    redirect = " >&2" if err else ""
    return f'i=1; while [ $i -le {n} ]; do echo "{text}"{redirect}; i=$((i+1)); done; '


def run_pods(node: SimNode) -> list[SimPod]:
    web = node.run_pod(
        "shop",
        "web-7d9f-x2",
        [SimContainerSpec(
            "nginx",
            lines(3, 'GET /index.html 200 $i') + lines(1, "upstream slow: 1.2 s", err=True)
            + "printf 'a last line without newline'",
            image="nginx:1.27",
        )],
        labels={"app": "web", "app.kubernetes.io/part-of": "shop"},
        owner=("ReplicaSet", "web-7d9f"),
    )
    job = node.run_pod(
        "jobs", "report-29", [SimContainerSpec("report", lines(2, "row $i of 2"))],
        driver="systemd", qos="burstable",
    )
    blink = node.run_pod(
        "default", "blink",
        [SimContainerSpec("blink", lines(3, "short-lived pod says $i"))],
        register="after",
    )
    secret = node.run_pod(
        "payments", "vault", [SimContainerSpec("vault", "sleep 0.5; " + lines(5, "token=s3cr3t"))],
        annotations={"podtap.io/exclude": "true"},
    )
    return [web, job, blink, secret]


def main() -> int:
    reason = simnode_unavailable_reason()
    if reason is not None or os.geteuid() != 0:
        say(f"the demo needs root and a BPF-capable kernel: {reason or 'not root'}")
        return 1
    say("podtap demo: a simulated node (containerd + runc containers, a loopback kubelet),")
    say("the real BPF program, and `podtap run` printing enriched records.\n")
    with SimNode() as node, tempfile.TemporaryDirectory() as tmp:
        agent = AgentRun(node, Path(tmp), kube={"poll_interval_s": 1.0})
        say("agent started; running 4 pods (one excluded by annotation)...\n")
        pods = run_pods(node)
        for pod in pods:
            pod.wait()
        shipped = [c for pod in pods if not pod.annotations for c in pod.containers]
        agent.wait_for(
            lambda: all(
                (joined(agent.of(c), "stdout"), joined(agent.of(c), "stderr")) == c.output()
                for c in shipped
            ),
            timeout=120,
            why="every line of the pods that are not excluded",
        )
        stats = agent.stop()
        records = agent.records()
    if not records:
        say("no records: see the agent's log above")
        return 1
    say("one record as shipped (Fluent Bit's kubernetes schema):")
    say(json.dumps(records[0], indent=2))
    say("\nall records (namespace/pod/container stream: message):")
    for r in records:
        k = r["kubernetes"]
        partial = "  [partial]" if r["partial"] else ""
        say(f"  {k['namespace_name']}/{k['pod_name']}/{k['container_name']} "
            f"{r['stream']}: {r['message']}{partial}")
    say("\nnothing from payments/vault: it is excluded in the kernel, before any copy")
    say("\nagent counters:")
    for key in ("kernel_records", "kernel_drop_records", "kernel_unknown_records", "held_lines",
                "released_lines", "dropped_unresolved", "containers_excluded",
                "watch_delay_ms_avg", "watch_delay_ms_max"):
        say(f"  {key:24s} {stats.get(key)}")
    say("\n(held/released: lines written before the kubelet knew their pod, shipped once it did)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
