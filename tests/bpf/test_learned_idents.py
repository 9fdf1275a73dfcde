"""The stream identities the kernel learned at a container's first exec are authoritative.

The real BPF program learns a container's stdout/stderr at the first exec inside its
cgroup (`on_process_exec`, the runtime starting the entrypoint). Later, /proc can
disagree: here the entrypoint moves its own fd 1 to /dev/null and keeps writing to the
container's stdout pipe through fd 3 (as servers that open /dev/stdout as fd 4+ do).
Discovery must put the learned identities in the map, not what /proc shows now, or
every line is lost. Root, BTF, bcc and cgroup v2.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.capture import bpfsys
from agent.capture.events import EV_DATA
from agent.capture.probe import CONSTANTS
from agent.config import KubeConfig
from agent.kube.discovery import Discovery
from agent.kube.filters import Filters
from agent.kube.model import ContainerMeta, FileIdent
from simnode.containers import Container, remove_tree
from tests.kernel import LiveProbe

pytestmark = pytest.mark.kernel

CONTAINER = struct.Struct("<QQIIII")  # struct container of bpf/podtap.h
Idents = tuple[FileIdent, FileIdent]


def learned_reader(live: LiveProbe) -> Callable[[int], Idents | None]:
    """What the probe should offer Discovery: the `learned_idents` map, by cgroup id."""
    fd = live.probe.map("learned_idents").fd

    def learned(cgroup_id: int) -> Idents | None:
        raw = bpfsys.map_lookup(fd, struct.pack("<Q", cgroup_id), CONTAINER.size)
        if raw is None:
            return None
        out_ino, err_ino, out_dev, err_dev, flags, _ = CONTAINER.unpack(raw)
        if not flags & CONSTANTS["C_IDENT_KNOWN"]:
            return None
        return FileIdent(out_dev, out_ino), FileIdent(err_dev, err_ino)

    return learned


class NoKubelet:
    """Discovery.sync() is driven directly here: no kubelet round trip."""


@pytest.fixture
def root(mount: str) -> Iterator[str]:
    name = f"podtap-test-learned-{secrets.token_hex(4)}"
    os.mkdir(os.path.join(mount, name))
    try:
        yield name
    finally:
        remove_tree(Path(mount, name))


# The entrypoint keeps the container's stdout as fd 3 and points fd 1 at /dev/null.
SCRIPT = (
    "exec 3>&1 1>/dev/null; "
    'while [ ! -e "$GO" ]; do sleep 0.02; done; '
    'i=0; while [ $i -lt 20 ]; do echo "line $i" >&3; i=$((i+1)); done; '
    "exec sleep 3600"
)


def test_learned_identities_win_over_what_proc_shows_later(
    live: LiveProbe, mount: str, root: str, tmp_path: Path
) -> None:
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    c = Container(Path(mount, root, f"kubepods/besteffort/pod{uid}/{cid}"))
    discovery = Discovery(
        KubeConfig(cgroup_roots=(root,)),
        Filters.of(),
        NoKubelet(),  # type: ignore[arg-type]
        live.probe,
        mount,
        "node-1",
        f"/{root}",
        learned_idents=learned_reader(live),
        find_own_cgroup=None,
    )
    meta = ContainerMeta("shop", "web-0", uid, "web", cid, "containerd", "web:1", "node-1",
                         "besteffort")
    try:
        discovery.sync([meta])  # in the map before it has a process: learned at its exec
        go = tmp_path / "go"
        init = c.spawn(["/bin/sh", "-c", SCRIPT], env={**os.environ, "GO": str(go)})
        c.wait_joined(init.pid)
        fd1 = Path(f"/proc/{init.pid}/fd/1")
        assert _wait(lambda: os.path.realpath(fd1) == "/dev/null"), "fd 1 still the pipe"
        assert _wait(lambda: learned_reader(live)(c.cgroup_id) is not None)
        discovery.refresh_idents()  # /proc would now say: stdout is /dev/null
        known = discovery.lookup(c.cgroup_id)
        assert known is not None
        assert (known.stdout, known.stderr) == (c.stdout_ident, c.stderr_ident)
        go.touch()
        expected = b"".join(b"line %d\n" % i for i in range(20))
        assert _wait(lambda: _stdout_bytes(live, c.cgroup_id) == expected)
    finally:
        c.finish()


def _stdout_bytes(live: LiveProbe, cgroup_id: int) -> bytes:
    return b"".join(r[8] for r in live.records(cgroup_id) if r[4] == EV_DATA and r[5] == 1)


def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
