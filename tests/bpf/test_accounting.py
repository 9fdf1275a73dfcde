"""Every byte is either captured or counted: loss, truncation, uncapturable syscalls."""

from __future__ import annotations

import os
import sys

import pytest

from agent.capture.events import EV_DATA, F_TRUNCATED, RingReader, decode
from agent.capture.probe import Probe
from agent.config import CaptureConfig
from simnode.containers import CgroupSandbox
from tests.kernel import LiveProbe, start_tap, stop_tap, watch

pytestmark = pytest.mark.kernel

BURST_LINES = 200_000



def burst_code(lines: int) -> str:
    return f"import os\nfor i in range({lines}): os.write(1, b'burst line %07d padding\\n' % i)"


def test_burst_of_200k_lines_has_zero_loss_at_default_ring_size(sandbox: CgroupSandbox) -> None:
    c = sandbox.container()
    c.start_init()
    tap = start_tap("--cgroup", str(c.path))
    try:
        assert c.python(burst_code(BURST_LINES)).wait(300) == 0
    finally:
        out, _ = c.finish()
        stop_tap(tap, timeout=300)
    counters = tap.counters()
    assert counters["dropped_records"] == 0 and counters["dropped_bytes"] == 0
    messages = [o["message"] for o in tap.objects]
    assert len(messages) == BURST_LINES
    assert "".join(m + "\n" for m in messages).encode() == out
    assert counters["records"] == BURST_LINES


def test_tiny_ring_drops_are_counted_exactly() -> None:
    """A 4 KiB ring that nobody drains while a burst is written: what is not in the
    ring is in the drop counters, to the byte and to the record."""
    sandbox = CgroupSandbox()
    probe = Probe(CaptureConfig(ring_bytes=4096))
    try:
        probe.load()
        c = sandbox.container()
        probe.watch(c.cgroup_id, c.stdout_ident, c.stderr_ident)
        reader = RingReader(probe.ring_fd, probe.ring_size)
        probe.attach()
        assert c.python(burst_code(5000)).wait(60) == 0
        out, _ = c.finish()
        probe.detach()
        records = [r for r in decode(reader.drain(1 << 30)) if r[4] == EV_DATA]
        counters = probe.counters()
        reader.close()
    finally:
        probe.close()
        sandbox.cleanup()
    captured = sum(len(r[8]) for r in records)
    assert counters["drop_records"] > 0, "a 4 KiB ring cannot hold 5000 lines"
    assert captured + counters["drop_bytes"] == len(out)
    assert len(records) + counters["drop_records"] == 5000
    assert counters["records"] == len(records) and counters["bytes"] == captured
    # What made it is intact: each record is one whole line of the burst.
    lines = set(out.splitlines(keepends=True))
    assert all(r[8] in lines for r in records)


def test_tiny_ring_with_live_drain_counts_every_lost_byte(sandbox: CgroupSandbox) -> None:
    """Through `podtap tap --ring-bytes 4096`: lines shipped + bytes dropped = bytes written,
    and a line that lost bytes in the middle is never glued to another one."""
    c = sandbox.container()
    c.start_init()
    tap = start_tap("--cgroup", str(c.path), "--ring-bytes", "4096", "--chunk", "2048")
    try:
        assert c.python(burst_code(50_000)).wait(120) == 0
    finally:
        out, _ = c.finish()
        stop_tap(tap)
    counters = tap.counters()
    shipped = sum(len(o["message"]) + (0 if o["partial"] else 1) for o in tap.objects)
    assert shipped == counters["bytes"]
    assert counters["bytes"] + counters["dropped_bytes"] == len(out)
    written = set(out.decode().splitlines())
    assert all(o["message"] in written for o in tap.objects if not o["partial"])


def test_write_beyond_max_write_is_truncated_and_counted(
    live: LiveProbe, sandbox: CgroupSandbox
) -> None:
    c = sandbox.container()
    watch(live, c)
    size = 3 << 20  # 3 MiB in one write; the default maximum is 1 MiB
    try:
        code = f"import os\nassert os.write(1, b'z' * {size - 1} + b'\\n') == {size}"
        before = live.probe.counters()
        assert c.python(code).wait(60) == 0
        out, _ = c.finish()
        records = [r for r in live.records(c.cgroup_id) if r[4] == EV_DATA]
        after = live.probe.counters()
    finally:
        live.probe.unwatch(c.cgroup_id)
    limit = live.cfg.capture.max_write
    assert len(out) == size
    assert b"".join(r[8] for r in records) == out[:limit]
    assert after["trunc_bytes"] - before["trunc_bytes"] == size - limit
    assert records[-1][6] & F_TRUNCATED
    assert not any(r[6] & F_TRUNCATED for r in records[:-1])


def test_uncapturable_syscalls_are_counted_to_the_byte(
    live: LiveProbe, sandbox: CgroupSandbox, tmp_path: object
) -> None:
    """sendfile, splice, tee, vmsplice and copy_file_range into the stream: not copyable
    by a write tracepoint, so counted (bytes and calls), and absent from the capture."""
    c = sandbox.container()
    watch(live, c)
    code = (
        "import os, tempfile\n"
        "f = tempfile.TemporaryFile(); f.write(b'S' * 5000); f.flush()\n"
        "n = 0\n"
        "n += os.sendfile(1, f.fileno(), 0, 1000)\n"
        "r, w = os.pipe(); os.write(w, b'P' * 700)\n"
        "n += os.splice(r, 1, 700)\n"
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "os.write(w, b'T' * 300)\n"
        "t = libc.tee(r, 1, 300, 0); assert t == 300, ctypes.get_errno(); n += t\n"
        "os.write(1, b'plain write\\n')\n"
        "print(n, file=open('/proc/self/fd/2', 'w'))\n"
    )
    try:
        before = live.probe.counters()
        assert c.python(code).wait(60) == 0
        out, err = c.finish()
        records = [r for r in live.records(c.cgroup_id) if r[4] == EV_DATA]
        after = live.probe.counters()
    finally:
        live.probe.unwatch(c.cgroup_id)
    moved = int(err.split()[-1])
    assert moved == 2000
    assert after["uncapt_bytes"] - before["uncapt_bytes"] == moved
    assert after["uncapt_calls"] - before["uncapt_calls"] == 3
    captured = b"".join(r[8] for r in records if r[5] == 1)
    assert captured == b"plain write\n"
    assert len(out) == moved + len(b"plain write\n")


def test_agent_never_captures_itself(sandbox: CgroupSandbox) -> None:
    """The tap runs inside the cgroup it taps and writes to the same kind of pipe:
    none of its own writes may come back (that would be a feedback loop)."""
    c = sandbox.container()
    c.start_init()
    tap_cmd = [sys.executable, "-m", "agent.cli", "tap", "--format", "json"]
    tap_cmd += ["--cgroup", str(c.path)]
    tap_proc = c.spawn(tap_cmd, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        c.wait_output(b"podtap: tapping")  # attached: the tap says so on its stderr
        writer = c.python("import os\nos.write(1, b'from the workload\\n')")
        assert writer.wait(60) == 0
        tap_proc.send_signal(2)
        tap_proc.wait(60)
    finally:
        out, err = c.finish()
    objects = [line for line in out.splitlines() if line.startswith(b"{")]
    assert objects, err.decode(errors="replace")
    assert all(b'"pid":%d,' % tap_proc.pid not in line for line in objects)
    assert any(b"from the workload" in line for line in objects)
