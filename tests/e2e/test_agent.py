"""`podtap run` end to end on a simulated node: real containerd/runc containers (and
systemd-layout cgroups), the loopback kubelet, the real BPF program.

The ground truth of each container is what the runtime relayed from its
stdout/stderr pipes (ctr's output, read by the test).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from simnode.agent import AgentRun, joined
from simnode.node import SimContainer, SimContainerSpec, SimNode

pytestmark = pytest.mark.kernel


def counted_lines(n: int, word: str, stream: str = "") -> str:
    redirect = " >&2" if stream == "err" else ""
    return f'i=0; while [ $i -lt {n} ]; do echo "{word} $i"{redirect}; i=$((i+1)); done; '


def assert_container_shipped(agent: AgentRun, c: SimContainer) -> list[dict[str, Any]]:
    """Every byte the container wrote to each stream arrived once, in order."""
    out, err = c.output()
    agent.wait_for(
        lambda: joined(agent.of(c), "stdout") == out and joined(agent.of(c), "stderr") == err,
        timeout=30,
        why=f"the lines of container {c.name}",
    )
    records = agent.of(c)
    assert joined(records, "stdout") == out
    assert joined(records, "stderr") == err
    return records


def assert_metadata(
    records: list[dict[str, Any]], node: SimNode, pod: Any, c: SimContainer
) -> None:
    for r in records:
        k = r["kubernetes"]
        assert k["namespace_name"] == pod.namespace
        assert k["pod_name"] == pod.name
        assert k["pod_id"] == pod.uid
        assert k["container_name"] == c.name
        assert k["docker_id"] == c.id
        assert k["host"] == node.node_name
        assert k["container_image"].endswith(c.image.split("/")[-1])
        assert k.get("labels", {}) == (pod.labels or {})


def test_every_line_of_every_container_arrives_once(node: SimNode, tmp_path: Path) -> None:
    agent = AgentRun(node, tmp_path)
    try:
        web = node.run_pod(
            "shop",
            "web-7d9f-x2",
            [
                SimContainerSpec(
                    "web", counted_lines(300, "GET /item") + counted_lines(40, "warn", "err")
                ),
                SimContainerSpec(
                    "sidecar", counted_lines(25, "sync") + "printf 'no newline at exit'"
                ),
            ],
            labels={"app": "web", "app.kubernetes.io/part-of": "shop"},
            owner=("ReplicaSet", "web-7d9f"),
        )
        batch = node.run_pod(
            "jobs",
            "report-1",
            [SimContainerSpec("worker", counted_lines(120, "row"))],
            driver="systemd",
            qos="burstable",
        )
        late = node.run_pod(
            "jobs",
            "late-registered",
            [SimContainerSpec("main", counted_lines(60, "early line"))],
            register="after",
        )
        for pod in (web, batch, late):
            pod.wait()
            for c in pod.containers:
                records = assert_container_shipped(agent, c)
                assert_metadata(records, node, pod, c)
        sidecar = agent.of(web.container("sidecar"))
        assert sidecar[-1]["message"] == "no newline at exit" and sidecar[-1]["partial"] is True
        assert all(not r["partial"] for r in sidecar[:-1])
        owner = agent.of(web.container("web"))[0]["kubernetes"]
        assert owner.get("ownerReferences") == [{"kind": "ReplicaSet", "name": "web-7d9f"}]
    finally:
        stats = agent.stop()
    assert stats["kernel_drop_records"] == 0
    assert stats["dropped_unresolved"] == 0 and stats["dropped_hold_full"] == 0


@pytest.mark.parametrize("register", ["before", "after"])
def test_a_200ms_pod_loses_nothing(node: SimNode, tmp_path: Path, register: str) -> None:
    """Starts, prints 10 lines, exits: with register=after the kubelet lists it only
    after it exited and its cgroup is gone."""
    agent = AgentRun(node, tmp_path)
    try:
        pod = node.run_pod(
            "default",
            f"blink-{register}",
            [SimContainerSpec("blink", counted_lines(10, "blink"))],
            register=register,
        )
        pod.wait()
        c = pod.containers[0]
        records = assert_container_shipped(agent, c)
        assert [r["message"] for r in records] == [f"blink {i}" for i in range(10)]
        assert_metadata(records, node, pod, c)
    finally:
        stats = agent.stop()
    assert stats["kernel_drop_records"] == 0


def test_excluded_containers_are_filtered_in_the_kernel(node: SimNode, tmp_path: Path) -> None:
    agent = AgentRun(node, tmp_path)
    try:
        go = "while [ ! -e /go-excluded ]; do sleep 0.02; done; "  # once the agent knows them
        secret = go + counted_lines(200, "secret") + counted_lines(20, "secret", "err")
        pod = node.run_pod(
            "payments",
            "vault",
            [SimContainerSpec("vault", secret)],
            annotations={"podtap.io/exclude": "true"},
        )
        partly = node.run_pod(
            "payments",
            "api",
            [
                SimContainerSpec("api", go + counted_lines(30, "public")),
                SimContainerSpec("keys", go + counted_lines(30, "secret")),
            ],
            annotations={"podtap.io/exclude-keys": "true"},
        )
        for known in ("excluded payments/vault/vault", "watching payments/api/api",
                      "excluded payments/api/keys"):
            agent.wait_log(known)
        (node.rootfs / "go-excluded").touch()
        pod.wait()
        partly.wait()
        assert_container_shipped(agent, partly.container("api"))
    finally:
        stats = agent.stop()
    assert not any("secret" in r["message"] for r in agent.records())
    # The kernel copied only the 30 writes of the one container that is not excluded.
    assert stats["kernel_writes"] == 30
    assert stats["kernel_unknown_records"] == 0
    assert stats["excluded_lines"] == 0
    assert stats["containers_excluded"] == 2


def test_a_deleted_pods_late_lines_are_still_enriched(node: SimNode, tmp_path: Path) -> None:
    agent = AgentRun(node, tmp_path, kube={"deleted_grace_s": 30.0, "poll_interval_s": 0.3})
    try:
        script = (
            'i=0; while [ $i -lt 40 ]; do echo "tick $i"; i=$((i+1)); sleep 0.05; done; '
            "printf 'final partial'"
        )
        pod = node.run_pod("default", "terminating", [SimContainerSpec("app", script)])
        c = pod.containers[0]
        agent.wait_for(lambda: len(agent.of(c)) >= 5, why="the first ticks")
        node.unregister_pod(pod)  # deleted from the API; the container is still running
        polls_then = len(agent.records())
        pod.wait()
        records = assert_container_shipped(agent, c)
        assert len(agent.records()) > polls_then
        assert_metadata(records, node, pod, c)
        assert records[-1]["message"] == "final partial" and records[-1]["partial"]
    finally:
        agent.stop()


FAULTS = ["401", "403", "500", "malformed", "slow", "down"]


def kubelet_error_lines(agent: AgentRun) -> int:
    """The agent's log lines about a failed kubelet poll (JSON or text logs)."""
    return sum(
        1
        for line in list(agent.log)
        if "podtap.kube: kubelet:" in line
        or ('"podtap.kube"' in line and '"msg":"kubelet:' in line)
    )


def test_kubelet_faults_do_not_stop_the_capture_of_known_containers(
    node: SimNode, tmp_path: Path
) -> None:
    agent = AgentRun(node, tmp_path, kube={"poll_interval_s": 0.2, "timeout_s": 2.0})
    try:
        # Beats for as long as the faults take (however slow the machine), then stops.
        script = (
            'i=0; while [ ! -e /stop-steady ]; do echo "beat $i"; i=$((i+1)); sleep 0.02; done'
        )
        pod = node.run_pod("default", "steady", [SimContainerSpec("app", script)])
        c = pod.containers[0]
        agent.wait_for(lambda: len(agent.of(c)) >= 5, why="the first beats")
        for mode in FAULTS:
            errors = kubelet_error_lines(agent)
            node.kubelet.set_mode(mode, slow_delay_s=120.0)  # outlasts the agent's timeout
            agent.wait_for(
                lambda e=errors: kubelet_error_lines(agent) > e, why=f"the error of {mode}"
            )
            before = len(agent.of(c))
            agent.wait_for(lambda b=before: len(agent.of(c)) >= b + 10, why=f"beats during {mode}")
            assert agent.alive()
        node.kubelet.set_mode("ok")
        (node.rootfs / "stop-steady").touch()
        pod.wait(60)
        records = assert_container_shipped(agent, c)
        assert_metadata(records, node, pod, c)
        log = agent.logs()
    finally:
        stats = agent.stop()
    assert stats["kubelet_errors"] >= len(FAULTS)
    assert "nodes/pods" in log  # the 401/403 message names the missing RBAC rule
    assert "kubelet:" in log


def test_agent_started_with_the_kubelet_down_holds_lines_until_it_is_back(
    node: SimNode, tmp_path: Path
) -> None:
    node.kubelet.set_mode("down")
    agent = AgentRun(node, tmp_path, kube={"poll_interval_s": 0.3})
    try:
        pod = node.run_pod(
            "default", "patient", [SimContainerSpec("app", counted_lines(20, "held"))]
        )
        pod.wait()
        agent.wait_for(
            lambda: agent.metric("podtap_hold_lines_total") >= 20, why="the 20 lines held"
        )
        assert agent.of(pod.containers[0]) == []  # held: no metadata yet
        node.kubelet.set_mode("ok")
        records = assert_container_shipped(agent, pod.containers[0])
        assert_metadata(records, node, pod, pod.containers[0])
    finally:
        stats = agent.stop()
    assert stats["released_lines"] == 20


def test_namespace_and_node_labels_from_the_api_server(node: SimNode, tmp_path: Path) -> None:
    """records.include_namespace_labels: list+watch of namespaces on the API server (a
    loopback server implementing the list/watch API), applied to running containers;
    records.include_node_labels: the node's labels, read at start."""
    from simnode.apiserver import FakeApiServer

    zone = {"topology.kubernetes.io/zone": "eu-west-1a"}
    with FakeApiServer(
        token=node.token, tls=node.kubelet.tls, node_name=node.node_name, node_labels=zone
    ) as api:
        api.add_namespace("shop", {"team": "checkout", "env": "prod"})
        agent = AgentRun(
            node,
            tmp_path,
            kube={"apiserver_url": api.url, "apiserver_ca_path": api.ca_path},
            records={"include_namespace_labels": True, "include_node_labels": True},
        )
        try:
            script = 'i=0; while [ $i -lt 60 ]; do echo "sale $i"; i=$((i+1)); sleep 0.05; done'
            pod = node.run_pod("shop", "cart", [SimContainerSpec("app", script)])
            c = pod.containers[0]
            agent.wait_for(lambda: len(agent.of(c)) >= 5, why="the first sales")
            api.label_namespace("shop", {"team": "payments", "env": "prod"})
            pod.wait()
            records = assert_container_shipped(agent, c)
        finally:
            stats = agent.stop()
    teams = [r["kubernetes_namespace"]["labels"]["team"] for r in records]
    assert teams[0] == "checkout" and teams[-1] == "payments"
    first_new = teams.index("payments")
    assert set(teams[first_new:]) == {"payments"}  # no flapping back once changed
    assert all(r["kubernetes_namespace"]["name"] == "shop" for r in records)
    assert all(r["kubernetes"]["node_labels"] == zone for r in records)
    assert stats["namespace_lists"] >= 1 and stats["namespace_errors"] == 0


def test_agent_started_while_containers_run_captures_from_then_on(
    node: SimNode, tmp_path: Path
) -> None:
    """A DaemonSet rollout: the containers were there first.  The first poll puts them in
    the map with their stream identities before the probes are attached; from then on
    every line arrives, in order, on the right stream."""
    # Beats until told to stop (however long the agent takes to start), then a last line.
    script = (
        'i=0; while [ ! -e /stop-veteran ]; do echo "beat $i"; echo "err $i" >&2; '
        "i=$((i+1)); sleep 0.03; done; echo last; echo last >&2"
    )
    pod = node.run_pod("default", "veteran", [SimContainerSpec("app", script)])
    c = pod.containers[0]
    deadline = time.monotonic() + 60
    while b"beat 3\n" not in c.output_so_far()[0]:  # it has been running for a while
        assert time.monotonic() < deadline and c.running, "the container did not start"
        time.sleep(0.01)
    agent = AgentRun(node, tmp_path)
    try:
        agent.wait_for(lambda: len(agent.of(c)) >= 10, why="beats captured while it runs")
        (node.rootfs / "stop-veteran").touch()
        pod.wait()
        out, err = c.output()
        agent.wait_for(
            lambda: joined(agent.of(c), "stdout").endswith(b"\nlast\n")
            and joined(agent.of(c), "stderr").endswith(b"\nlast\n"),
            why="the last lines of the running container",
        )
        records = agent.of(c)
    finally:
        stats = agent.stop()
    got_out, got_err = joined(records, "stdout"), joined(records, "stderr")
    # What was captured is exactly the tail of each stream, from a line boundary on.
    for got, written in ((got_out, out), (got_err, err)):
        assert written.endswith(got)
        assert len(got) == len(written) or written[-len(got) - 1 : -len(got)] == b"\n"
    assert not out.startswith(got_out)  # the beats written before the agent started
    assert_metadata(records, node, pod, c)
    assert stats["kernel_unknown_records"] == 0  # known from the first poll on
