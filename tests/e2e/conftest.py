"""Fixtures of the end-to-end tests: a simulated node with the real BPF program."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from simnode.agent import AgentRun
from simnode.node import SimNode, simnode_unavailable_reason
from tests.kernel import require_kernel, unavailable


@pytest.fixture
def node() -> Iterator[SimNode]:
    """A fresh simulated node (containerd, loopback kubelet); the kernel tests' gating."""
    require_kernel()
    reason = simnode_unavailable_reason()
    if reason is not None:
        unavailable(f"the simulated node cannot run: {reason}")
    with SimNode() as sim:
        yield sim


@pytest.fixture(autouse=True)
def _no_agent_left_behind() -> Iterator[None]:
    """A test that failed before stopping its agent must not leave it running."""
    yield
    while AgentRun.running:
        agent = AgentRun.running.pop()
        if agent.alive():
            agent.kill()
