"""Fixtures shared by the unit, kernel and end-to-end tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.kube.cgroups import CgroupError, find_cgroup2_mount
from simnode.containers import CgroupSandbox
from tests.kernel import unavailable


@pytest.fixture(scope="module")
def mount() -> str:
    """The cgroup v2 mount, for tests that create real cgroups (root only)."""
    if os.geteuid() != 0:
        unavailable("needs root to create cgroups")
    try:
        return find_cgroup2_mount()
    except CgroupError as e:
        unavailable(f"no cgroup v2: {e}")


@pytest.fixture
def sandbox() -> Iterator[CgroupSandbox]:
    """A private cgroup subtree with test containers, removed afterwards."""
    box = CgroupSandbox()
    try:
        yield box
    finally:
        box.cleanup()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts child processes; kills and reaps them (by pid, they are ours) afterwards."""
    children: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        child: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
            for pipe in (child.stdin, child.stdout, child.stderr):
                if pipe is not None:
                    pipe.close()
