"""The outside_pods cache of `podtap run`'s program: a writer outside the pods' subtree is
remembered by cgroup id so that its next writes skip the ancestor check, and the cache
never keeps a writer under the subtree out (real program, real cgroups, real writers)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from agent.capture import bpfsys
from agent.capture.abi import CONSTANTS
from agent.capture.events import EV_DATA
from agent.capture.probe import PodsRoot
from agent.config import Config
from simnode.containers import CgroupSandbox, Container
from tests.kernel import LiveProbe, require_kernel

SLOTS = CONSTANTS["OUTSIDE_SLOTS"]
F_UNKNOWN = CONSTANTS["F_UNKNOWN"]


@pytest.fixture(scope="module")
def box() -> Iterator[CgroupSandbox]:
    require_kernel()
    sandbox = CgroupSandbox()
    (sandbox.root / "kubepods").mkdir()
    yield sandbox
    sandbox.cleanup()


@pytest.fixture(scope="module")
def live(box: CgroupSandbox) -> Iterator[LiveProbe]:
    pods = box.root / "kubepods"
    probe = LiveProbe(Config(), PodsRoot(pods.stat().st_ino, len(pods.relative_to(
        box.mount).parts)))
    yield probe
    probe.close()


def cached(live: LiveProbe, cgroup_id: int) -> int:
    """The cgroup id the cache holds in `cgroup_id`'s slot (0: none)."""
    m = live.probe.map("outside_pods")
    value = bpfsys.map_lookup(m.fd, struct.pack("<I", cgroup_id & (SLOTS - 1)), 8)
    assert value is not None
    return int(struct.unpack("<Q", value)[0])


def set_cached(live: LiveProbe, cgroup_id: int, value: int) -> None:
    m = live.probe.map("outside_pods")
    bpfsys.map_update(m.fd, struct.pack("<I", cgroup_id & (SLOTS - 1)), struct.pack("<Q", value))


def write_lines(c: Container, marker: str, n: int = 3) -> None:
    proc = c.spawn(["sh", "-c", f'for i in $(seq {n}); do echo "{marker} $i"; done'])
    assert proc.wait(60) == 0
    c.wait_output(f"{marker} {n}\n".encode())


def data_of(live: LiveProbe, c: Container) -> bytes:
    return b"".join(r[8] for r in live.records(c.cgroup_id) if r[4] == EV_DATA)


@pytest.mark.parametrize("depth", ["outside", "outside/nested"])
def test_a_writer_outside_the_subtree_is_remembered_and_not_captured(
        box: CgroupSandbox, live: LiveProbe, depth: str) -> None:
    c = box.container(depth.replace("outside", f"outside-{len(box.containers)}"))
    write_lines(c, "host")
    assert cached(live, c.cgroup_id) == c.cgroup_id
    write_lines(c, "host again")  # now answered by the cache
    assert data_of(live, c) == b""
    assert cached(live, c.cgroup_id) == c.cgroup_id


@pytest.mark.parametrize("depth", ["pod-a/ctr", "pod-b/ctr/nested", "pod-c"])
def test_a_writer_under_the_subtree_is_captured_and_never_cached(
        box: CgroupSandbox, live: LiveProbe, depth: str) -> None:
    c = box.container(f"kubepods/{depth}")
    write_lines(c, "pod")
    assert data_of(live, c) == b"pod 1\npod 2\npod 3\n"
    assert all(r[6] & F_UNKNOWN for r in live.records(c.cgroup_id) if r[4] == EV_DATA)
    assert cached(live, c.cgroup_id) != c.cgroup_id


def test_a_slot_held_by_another_cgroup_does_not_hide_a_pod(
        box: CgroupSandbox, live: LiveProbe) -> None:
    """Two cgroups share a slot: the cache holds the outside one, a pod writes after."""
    c = box.container("kubepods/pod-shared/ctr")
    other = c.cgroup_id + SLOTS  # the same slot, another id
    set_cached(live, c.cgroup_id, other)
    write_lines(c, "shared")
    assert data_of(live, c) == b"shared 1\nshared 2\nshared 3\n"
    assert cached(live, c.cgroup_id) == other  # a pod's id is never written there


def test_a_cached_slot_taken_over_by_another_outside_writer(
        box: CgroupSandbox, live: LiveProbe) -> None:
    c = box.container("outside-takeover")
    set_cached(live, c.cgroup_id, c.cgroup_id + SLOTS)
    write_lines(c, "takeover")
    assert cached(live, c.cgroup_id) == c.cgroup_id
    assert data_of(live, c) == b""
