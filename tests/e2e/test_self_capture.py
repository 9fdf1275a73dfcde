"""podtap never ships its own output, nor another podtap's, whatever the pid namespace.

`podtap run` itself runs as a container of the simulated node: its process is in a pod's
cgroup, in its own pid namespace (pid 1 there: the kernel's pid-based self exclusion
cannot recognise it) and its own cgroup namespace (/proc/self/cgroup reads `0::/`), and
its stdout — where it ships records — is the container's stdout pipe. Its pod is listed
by the kubelet without any podtap label, so only its cgroup can tell it is itself.
Another pod carrying the podtap label writes too (a second agent during a rolling
update); a sibling application pod writes lines that must arrive.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from simnode.agent import REPO, agent_config, joined
from simnode.node import SimContainer, SimContainerSpec, SimNode
from tests.kernel import unavailable

pytestmark = pytest.mark.kernel

AGENT_LABELS = {"app.kubernetes.io/name": "podtap", "app.kubernetes.io/instance": "podtap"}


@pytest.fixture
def node(node: SimNode) -> SimNode:
    if shutil.which("unshare") is None:
        unavailable("needs unshare (util-linux)")
    return node


def lines_after(gate: str, n: int, word: str) -> str:
    """Wait for the gate file (in the rootfs), then write n lines, one write each."""
    return (
        f"while [ ! -e /{gate} ]; do sleep 0.02; done; "
        f'i=0; while [ $i -lt {n} ]; do echo "{word} $i"; i=$((i+1)); done'
    )


def agent_script(config: Path) -> str:
    """The agent as a container's process: pid 1 of a new pid namespace, in a new cgroup
    namespace rooted at its container's cgroup."""
    argv = [
        shutil.which("unshare") or "unshare", "--pid", "--cgroup", "--fork", "--kill-child",
        sys.executable, "-m", "agent.cli", "run", "-c", str(config),
    ]
    return (
        f"export PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH={shlex.quote(str(REPO))} "
        f"PYTHONUNBUFFERED=1; cd {shlex.quote(str(REPO))}; exec {shlex.join(argv)}"
    )


class AgentContainer:
    """The agent's container: its shipped records (its stdout) and its log (its stderr)."""

    def __init__(self, container: SimContainer) -> None:
        self.c = container

    def records(self) -> list[dict[str, Any]]:
        out = self.c.output_so_far()[0]
        complete = out[: out.rfind(b"\n") + 1]
        return [orjson.loads(line) for line in complete.splitlines()]

    def log(self) -> str:
        return self.c.output_so_far()[1].decode(errors="replace")

    def of(self, container: SimContainer) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kubernetes"]["docker_id"] == container.id]

    def wait_for(self, what: Callable[[], bool], why: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if not self.c.running:
                raise AssertionError(f"the agent exited:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {why}:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """SIGTERM to the agent (the unshare's child, by its host pid); its final stats."""
        unshare_pid = self.c.pid
        procs = (self.c.cgroup_path / "cgroup.procs").read_text().split()
        for pid in (int(p) for p in procs):
            if pid != unshare_pid and parent_of(pid) == unshare_pid:
                os.kill(pid, signal.SIGTERM)
        self.c.wait(120)
        log = self.log()
        for line in reversed(log.splitlines()):
            stats = final_stats(line)
            if stats is not None:
                return stats
        raise AssertionError("no final stats in the agent's log:\n" + log[-4000:])


def final_stats(line: str) -> dict[str, Any] | None:
    """The counters of the agent's last log line (JSON logs, or the text `stopped: {...}`)."""
    if line.startswith("{"):
        entry = orjson.loads(line)
        return dict(entry["counters"]) if entry.get("msg") == "stopped" else None
    if "stopped: {" in line:
        return dict(ast.literal_eval(line[line.index("{"):]))
    return None


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_agent_in_its_own_namespaces_never_captures_itself_or_other_agents(
    node: SimNode, tmp_path: Path
) -> None:
    config = tmp_path / "podtap.yaml"
    config.write_text(yaml.safe_dump(agent_config(node, kube={"poll_interval_s": 0.5})))
    pod = node.run_pod(
        "podtap", "podtap-a1", [SimContainerSpec("agent", agent_script(config))],
        driver="systemd",
    )
    agent = AgentContainer(pod.containers[0])
    stats: dict[str, Any] = {}
    try:
        agent.wait_for(lambda: "capturing:" in agent.log(), "the agent to start")
        assert "own cgroup " in agent.log() and "excluded podtap/podtap-a1/agent" in agent.log()

        other = node.run_pod(
            "podtap", "podtap-b2",
            [SimContainerSpec("agent", lines_after("go-other", 50, "other agent"))],
            labels=AGENT_LABELS,
        )
        agent.wait_for(
            lambda: "excluded podtap/podtap-b2/agent" in agent.log(), "the other agent's pod"
        )
        (node.rootfs / "go-other").touch()

        app = node.run_pod(
            "shop", "web-0", [SimContainerSpec("web", lines_after("go-app", 80, "GET /item"))]
        )
        web = app.containers[0]
        agent.wait_for(lambda: "watching shop/web-0/web" in agent.log(), "the app's pod")
        (node.rootfs / "go-app").touch()
        other.wait()
        app.wait()
        out, _err = web.output()
        agent.wait_for(lambda: joined(agent.of(web), "stdout") == out, "the app's lines")
        own = pod.containers[0]
        assert agent.of(own) == []
        assert agent.of(other.containers[0]) == []
        assert not any("other agent" in r["message"] for r in agent.records())
    finally:
        stats = agent.stop()
    # The kernel copied the app's 80 writes and nothing else: not the agent's own writes
    # of its records (by its cgroup), not the other agent's 50 (by its pod's label).
    assert stats["kernel_writes"] == 80, stats
    assert stats["excluded_lines"] == 0
    assert stats["containers_excluded"] >= 2
