"""Fixtures shared by the unit, kernel and end-to-end tests.

The HTTPS client tests: a module sets `TOKEN` (the bearer token its fake server accepts)
and may set `TLS_NAME` (the server certificate's subject name).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube.cgroups import CgroupError, find_cgroup2_mount
from simnode.containers import CgroupSandbox
from simnode.tls import TLSFiles, generate_tls
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


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, once per test module."""
    name = getattr(request.module, "TLS_NAME", "podtap-test")
    return generate_tls(tmp_path_factory.mktemp("tls"), name=name)


@pytest.fixture
def token_file(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The module's TOKEN in a file, as the service-account volume holds it."""
    path = tmp_path / "token"
    path.write_text(request.module.TOKEN + "\n")
    return path
