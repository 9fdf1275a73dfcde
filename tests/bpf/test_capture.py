"""Byte-exact capture, compared with the runtime-style pipe readers (ground truth).

Every scenario runs twice: through the library API (the real program loaded
once per session, records -> lines) and through `podtap tap --format json`.
"""

from __future__ import annotations

import sys

import pytest

from agent.capture.events import EV_DATA, EV_EXIT, F_FD_FALLBACK
from simnode.containers import CgroupSandbox
from tests.bpf.scenarios import SCENARIOS, Expect
from tests.kernel import (
    LiveProbe,
    joined_from_lines,
    lines_of,
    start_tap,
    stop_tap,
    watch,
)

pytestmark = pytest.mark.kernel


def compare_stream(
    name: str,
    truth: bytes,
    pieces: list[tuple[object, int, bytes]],
    expect: Expect,
) -> None:
    """pieces: (first timestamp, pid, bytes) of one stream, one per writer process."""
    got = b"".join(data for _, _, data in sorted(pieces, key=lambda p: p[0]))  # type: ignore[arg-type, return-value]
    if expect.concurrent:
        assert len(got) == len(truth), f"{name}: {len(got)} bytes captured, {len(truth)} written"
        assert sorted(got) == sorted(truth), f"{name}: captured bytes differ from the pipe's"
        if expect.per_pid is not None:
            for _, pid, data in pieces:
                assert expect.per_pid(data), f"{name}: pid {pid} bytes mixed or incomplete"
    else:
        assert got == truth, _diff(name, got, truth)


def _diff(name: str, got: bytes, truth: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, truth, strict=False)) if a != b), None)
    if at is None:
        at = min(len(got), len(truth))
    return (
        f"{name}: captured {len(got)} bytes, pipe {len(truth)}; first difference at {at}: "
        f"captured {got[max(0, at - 40):at + 40]!r} pipe {truth[max(0, at - 40):at + 40]!r}"
    )



@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_library_capture_is_byte_exact(
    live: LiveProbe, sandbox: CgroupSandbox, scenario: str
) -> None:
    c = sandbox.container()
    watch(live, c)
    try:
        expect = SCENARIOS[scenario](c)
        out, err = c.finish()
        records = live.records(c.cgroup_id)
    finally:
        live.probe.unwatch(c.cgroup_id)
    data = [r for r in records if r[4] == EV_DATA]
    assert not any(r[6] & F_FD_FALLBACK for r in data), "identities were known: no fallback"
    joined = joined_from_lines(lines_of(records))
    first_ts: dict[tuple[int, int], int] = {}
    for r in data:
        first_ts.setdefault((r[2], r[5]), r[0])
    for stream, truth in ((1, out), (2, err)):
        pieces = [(first_ts[k], k[0], v) for k, v in joined.items() if k[1] == stream]
        compare_stream(f"{scenario} stream {stream}", truth, pieces, expect)
    everything = b"".join(joined.values())
    for needle in expect.absent:
        assert needle not in everything, f"{needle!r} must not be captured"
    pids = {r[2] for r in records}
    assert not pids & set(expect.outsiders)
    # Every writer process that exited produced an exit record after its data.
    exited = {r[2] for r in records if r[4] == EV_EXIT}
    assert {pid for pid, _ in joined} <= exited


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tap_json_is_byte_exact(sandbox: CgroupSandbox, scenario: str) -> None:
    c = sandbox.container()
    c.start_init()  # its fds 1/2 give the tap the streams' identities
    tap = start_tap("--cgroup", str(c.path))
    try:
        expect = SCENARIOS[scenario](c)
    finally:
        out, err = c.finish()
        stop_tap(tap)
    first_time: dict[tuple[int, int], str] = {}
    for o in tap.objects:
        first_time.setdefault((o["pid"], 1 if o["stream"] == "stdout" else 2), o["time"])
        assert set(o) == {"time", "stream", "pid", "comm", "cgroup_id", "message", "partial"}
        assert o["cgroup_id"] == c.cgroup_id
    joined = tap.joined()
    for stream, truth in ((1, out), (2, err)):
        pieces = [
            (first_time[k], k[0], v.encode("utf-8", "surrogatepass"))
            for k, v in joined.items()
            if k[1] == stream
        ]
        text_truth = truth.decode("utf-8", "replace").encode("utf-8", "surrogatepass")
        compare_stream(f"{scenario} stream {stream} (tap)", text_truth, pieces, expect)
    everything = "".join(joined.values())
    for needle in expect.absent:
        assert needle.decode() not in everything
    assert not {o["pid"] for o in tap.objects} & set(expect.outsiders)
    counters = tap.counters()
    assert counters["dropped_records"] == 0 and counters["truncated_bytes"] == 0


def test_fallback_by_fd_number_until_identities_are_known(
    live: LiveProbe, sandbox: CgroupSandbox
) -> None:
    """Without identities from userspace or from an exec inside the cgroup (this process
    joins by itself and never execs there), fd 1/2 are the streams, and records say so."""
    c = sandbox.container()
    watch(live, c, idents=False)
    procs = c.path / "cgroup.procs"
    code = (
        f"import os\nopen({str(procs)!r}, 'w').write(str(os.getpid()))\n"
        "os.write(1, b'fb out\\n'); os.write(2, b'fb err\\n')"
    )
    try:
        proc = c.spawn_unjoined([sys.executable, "-c", code])
        assert proc.wait(30) == 0
        c.finish()
        records = [r for r in live.records(c.cgroup_id) if r[4] == EV_DATA]
    finally:
        live.probe.unwatch(c.cgroup_id)
    assert [(r[5], r[8]) for r in records] == [(1, b"fb out\n"), (2, b"fb err\n")]
    assert all(r[6] & F_FD_FALLBACK for r in records)


def test_tty_container(live: LiveProbe, sandbox: CgroupSandbox) -> None:
    """A container with a tty: stdout and stderr are one pty, seen as stdout."""
    c = sandbox.container(tty=True)
    watch(live, c)
    try:
        proc = c.python(
            "import os\nfor i in range(300): os.write(1 + i % 2, b'tty line %d\\n' % i)"
        )
        assert proc.wait(30) == 0
        out, _ = c.finish()
        records = live.records(c.cgroup_id)
    finally:
        live.probe.unwatch(c.cgroup_id)
    raw = b"".join(r[8] for r in records if r[4] == EV_DATA)
    # The pty's line discipline turns \n into \r\n on the way to the reader.
    assert raw.replace(b"\n", b"\r\n") == out
    assert {r[5] for r in records if r[4] == EV_DATA} == {1}


def test_socket_stdout_write_send_and_sendmsg(live: LiveProbe, sandbox: CgroupSandbox) -> None:
    """stdout/stderr may be unix stream sockets: write, send (sendto) and sendmsg with
    several buffers are all captured, byte for byte."""
    c = sandbox.container(sockets=True)
    watch(live, c)
    code = (
        "import os, socket\n"
        "out = socket.socket(fileno=1); err = socket.socket(fileno=2)\n"
        "for i in range(200):\n"
        "    os.write(1, b'write %d\\n' % i)\n"
        "    out.send(b'send %d\\n' % i)\n"
        "    out.sendmsg([b'sendmsg ', b'%d' % i, b'', b'\\n'])\n"
        "    err.sendmsg([b'err ', b'%d\\n' % i])\n"
    )
    try:
        assert c.python(code).wait(30) == 0
        out, err = c.finish()
        records = live.records(c.cgroup_id)
    finally:
        live.probe.unwatch(c.cgroup_id)
    joined = joined_from_lines(lines_of(records))
    assert b"".join(v for (_, s), v in joined.items() if s == 1) == out
    assert b"".join(v for (_, s), v in joined.items() if s == 2) == err
    assert out.count(b"sendmsg") == 200


def test_excluded_and_per_stream_filters_copy_nothing(
    live: LiveProbe, sandbox: CgroupSandbox
) -> None:
    """Filtering is in the kernel: an excluded stream produces no ring-buffer record."""
    only_err = sandbox.container()
    excluded = sandbox.container()
    watch(live, only_err, capture_stdout=False)
    watch(live, excluded, capture_stdout=False, capture_stderr=False)
    before = live.probe.counters()
    try:
        code = (
            "import os\n"
            "for i in range(500): os.write(1, b'o%d\\n' % i); os.write(2, b'e%d\\n' % i)"
        )
        for c in (only_err, excluded):
            assert c.python(code).wait(30) == 0
        _, err = only_err.finish()
        excluded.finish()
        kept = live.records(only_err.cgroup_id)
        dropped = live.records(excluded.cgroup_id)
    finally:
        live.probe.unwatch(only_err.cgroup_id)
        live.probe.unwatch(excluded.cgroup_id)
    after = live.probe.counters()
    assert b"".join(r[8] for r in kept if r[4] == EV_DATA) == err
    assert {r[5] for r in kept if r[4] == EV_DATA} == {2}
    assert [r for r in dropped if r[4] == EV_DATA] == []
    # Exactly the 500 stderr writes of the first container reached the ring buffer.
    assert after["writes"] - before["writes"] == 500
    assert after["records"] - before["records"] == 500
