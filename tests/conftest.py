"""Fixtures shared by the unit, kernel and end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from agent.kube.cgroups import CgroupError, find_cgroup2_mount
from tests.kernel import unavailable
from tests.simnode.containers import CgroupSandbox


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
