"""A container's streams are its init's, not an exec session's (issue: identities taken
from the lowest pid in the cgroup).

A containerd container of the simulated node runs; a `kubectl exec`-style session
(`ctr task exec`) is started in it with a lower pid than the container's init, as after
a pid wrap-around, its stdout ctr's pipe. `podtap run` starts after both, so the
container's stream identities come from /proc: what it ships must be exactly what the
container wrote to its own stdout/stderr, and nothing of the session.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from simnode.agent import AgentRun, joined
from simnode.node import SimContainerSpec, SimNode

pytestmark = pytest.mark.kernel


def gated_lines(gate: str, n: int, word: str, err: bool = False) -> str:
    redirect = " >&2" if err else ""
    return (
        f"while [ ! -e /{gate} ]; do sleep 0.02; done; "
        f'i=0; while [ $i -lt {n} ]; do echo "{word} $i"{redirect}; i=$((i+1)); done'
    )


def cgroup_pids(path: Path) -> list[int]:
    return [int(p) for p in (path / "cgroup.procs").read_text().split()]


@pytest.mark.parametrize("session_pid", ["lower", "higher"])
def test_exec_session_output_is_not_the_containers(
    node: SimNode, tmp_path: Path, session_pid: str
) -> None:
    pod = node.run_pod(
        "shop", "web-0",
        [SimContainerSpec("web", gated_lines("go", 40, "app") + "; " +
                          gated_lines("go", 5, "app-err", err=True) + "; " +
                          # the init outlives the session: its exit would kill it
                          "while [ ! -e /session-done ]; do sleep 0.02; done")],
    )
    c = pod.containers[0]
    assert c.pid is not None
    below = c.pid if session_pid == "lower" else None
    session = node.exec_in(
        c, gated_lines("go", 30, "session") + "; : > /session-done", below_pid=below
    )
    deadline = time.monotonic() + 60
    while len(cgroup_pids(c.cgroup_path)) < 2:  # the session's shell has joined
        assert time.monotonic() < deadline and session.poll() is None, "no exec session"
        time.sleep(0.01)
    others = [p for p in cgroup_pids(c.cgroup_path) if p != c.pid]
    if session_pid == "lower":
        assert min(others) < c.pid, (others, c.pid)
    agent = AgentRun(node, tmp_path)
    try:
        agent.wait_log("watching shop/web-0/web")
        (node.rootfs / "go").touch()
        # Its 30 writes went to its own stdout (ctr relays them, not always all of them).
        done = node.rootfs / "session-done"
        deadline = time.monotonic() + 60
        while not done.exists():
            assert time.monotonic() < deadline, "the exec session did not finish"
            time.sleep(0.01)
        pod.wait(60)
        out, err = c.output()
        agent.wait_for(
            lambda: joined(agent.of(c), "stdout") == out and joined(agent.of(c), "stderr") == err,
            timeout=60, why="the container's own lines",
        )
        assert not any("session" in r["message"] for r in agent.records())
    finally:
        if session.poll() is None:
            session.kill()
            session.wait(10)
        agent.stop()
