"""The kernel's watch_filter in front of the containers map: a slot stays set while any
watched cgroup of that slot is in the map, and capture follows watch/unwatch."""

from __future__ import annotations

import struct

from agent.capture import bpfsys
from agent.capture.abi import FILTER_SLOTS
from simnode.containers import CgroupSandbox
from tests.kernel import LiveProbe

_U32 = struct.Struct("<I")


def slot_value(live: LiveProbe, cgroup_id: int) -> int:
    raw = bpfsys.map_lookup(
        live.probe.map("watch_filter").fd, _U32.pack(cgroup_id & (FILTER_SLOTS - 1)), 1
    )
    assert raw is not None
    return raw[0]


def test_a_slot_is_set_while_any_of_its_cgroups_is_watched(live: LiveProbe) -> None:
    a = (1 << 40) + 12345  # no such cgroups: the maps take any id
    b = a + FILTER_SLOTS  # the same slot
    assert slot_value(live, a) == 0
    live.probe.watch(a)
    live.probe.watch(b)
    live.probe.watch(a)  # again (identities learned later): still one member
    live.probe.unwatch(a)
    assert slot_value(live, b) == 1  # b still needs its lookup
    live.probe.unwatch(b)
    assert slot_value(live, a) == 0


def test_capture_follows_watch_and_unwatch(live: LiveProbe, sandbox: CgroupSandbox) -> None:
    c = sandbox.container()
    c.start_init()
    live.probe.watch(c.cgroup_id, c.stdout_ident, c.stderr_ident)
    try:
        assert slot_value(live, c.cgroup_id) == 1
        proc = c.python("import os\nos.write(1, b'seen\\n')")
        assert proc.wait(60) == 0
        data = b"".join(rec[8] for rec in live.records(c.cgroup_id))
        assert data == b"seen\n"
    finally:
        live.probe.unwatch(c.cgroup_id)
    assert slot_value(live, c.cgroup_id) == 0
    c.finish()
