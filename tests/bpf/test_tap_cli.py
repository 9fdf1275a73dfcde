"""The `podtap tap` command line: stream selection, --pid, text format, signals, bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from simnode.containers import CgroupSandbox
from tests.kernel import REPO, start_tap, stop_tap

pytestmark = pytest.mark.kernel

BOTH = (
    "import os\n"
    "for i in range(100): os.write(1, b'out %d\\n' % i); os.write(2, b'err %d\\n' % i)"
)



@pytest.mark.parametrize(("flag", "kept"), [("--stdout", "stdout"), ("--stderr", "stderr")])
def test_one_stream_only_is_copied(sandbox: CgroupSandbox, flag: str, kept: str) -> None:
    c = sandbox.container()
    c.start_init()
    tap = start_tap("--cgroup", str(c.path), flag)
    try:
        assert c.python(BOTH).wait(30) == 0
    finally:
        out, err = c.finish()
        stop_tap(tap)
    assert {o["stream"] for o in tap.objects} == {kept}
    truth = out if kept == "stdout" else err
    assert "".join(o["message"] + "\n" for o in tap.objects).encode() == truth
    assert tap.counters()["records"] == 100  # the other stream never reached the ring


def test_pid_selects_the_cgroup_and_the_streams_of_that_process(sandbox: CgroupSandbox) -> None:
    c = sandbox.container()
    init = c.start_init()
    tap = start_tap("--pid", str(init.pid))
    try:
        assert c.python(BOTH).wait(30) == 0
    finally:
        out, err = c.finish()
        stop_tap(tap)
    got = {s: "".join(o["message"] + "\n" for o in tap.objects if o["stream"] == s).encode()
           for s in ("stdout", "stderr")}
    assert got == {"stdout": out, "stderr": err}


def test_text_format_and_sigterm_flush(sandbox: CgroupSandbox) -> None:
    c = sandbox.container()
    c.start_init()
    tap = start_tap("--cgroup", str(c.path), fmt="text")
    try:
        code = "import os, time\nos.write(1, b'hello text\\n'); os.write(2, b'no newline')\n"
        code += "time.sleep(0.3)"
        proc = c.python(code)
        assert proc.wait(30) == 0
    finally:
        c.finish()
        stop_tap(tap, sig=signal.SIGTERM)
    lines = tap.stdout.decode().splitlines()
    pattern = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (\d+) (\S+) (stdout|stderr): (.*)$")
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(3), m.group(4)) for m in parsed if m] == [
        ("stdout", "hello text"), ("stderr", "no newline")
    ]
    assert {m.group(1) for m in parsed if m} == {str(proc.pid)}
    assert "podtap: records=2 " in tap.stderr.decode()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["tap"], 2, "give at least one --cgroup or --pid"),
        (["tap", "--cgroup", "/nonexistent/podtap"], 1, "is not a cgroup v2 directory"),
        (["tap", "--cgroup", "/"], 1, "is not a cgroup v2 directory"),
        (["tap", "--pid", "999999999"], 1, "cannot read the cgroup of pid 999999999"),
        (["tap", "--cgroup", "x", "--max-write", "12q"], 2, "not a size"),
        (["tap", "--cgroup", "x", "--ring-bytes", "3000"], 2, "capture.ring_bytes must be"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], code: int, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr.decode()
    assert b"Traceback" not in proc.stderr


@pytest.mark.parametrize("by", ["cgroup", "pid"])
def test_refuses_the_root_cgroup(by: str) -> None:
    from agent.kube.cgroups import find_cgroup2_mount

    # kthreadd (pid 2) is always in the root cgroup
    target = ["--cgroup", find_cgroup2_mount()] if by == "cgroup" else ["--pid", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "tap", *target],
        capture_output=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 1
    assert b"refusing to tap the root cgroup" in proc.stderr


def test_check_passes_on_this_node() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check"], capture_output=True, cwd=REPO, timeout=120
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    for name in ("kernel version", "kernel BTF", "privileges", "tracefs", "tracepoints",
                 "BPF helpers and map types", "cgroup v2", "bcc", "kernel headers for bcc"):
        assert name in out
    assert re.search(r"^9 passed \(\d+ with warnings\), 0 failed$", out, re.M)


def test_check_looks_for_headers_where_the_configuration_puts_them(tmp_path: Path) -> None:
    cache = tmp_path / "headers"
    config = tmp_path / "podtap.yaml"
    config.write_text(f"capture:\n  headers_cache_dir: {cache}\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "check", "--config", str(config)],
                          capture_output=True, cwd=REPO, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "BCC_KERNEL_SOURCE"})
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    headers = next(line for line in out.splitlines() if "kernel headers for bcc" in line)
    # Debian's headers are merged into the configured cache; a tree of the host's own
    # (/lib/modules/<release>/build) is used in place and the cache is not needed.
    assert str(cache) in headers or "(host)" in headers, headers
    assert not cache.exists()  # check writes nothing


def test_check_refuses_a_bad_configuration(tmp_path: Path) -> None:
    config = tmp_path / "podtap.yaml"
    config.write_text("capture:\n  no_such_key: 1\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "check", "-c", str(config)],
                          capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert b"configuration error: unknown configuration key capture.no_such_key" in proc.stderr


def test_a_failing_ring_drain_stops_the_tap_with_an_error(
    sandbox: CgroupSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain thread dying (here: the ring mapping raising) must not leave the
    pipeline waiting forever: it stops, says why, and exits non-zero."""
    import asyncio
    import io

    from agent.capture import events
    from agent.config import Config
    from agent.tap import TapPipeline, resolve_targets

    def broken_drain(self: events.RingReader, max_bytes: int) -> bytes:
        raise OSError("ring mapping gone")

    monkeypatch.setattr(events.RingReader, "drain", broken_drain)
    c = sandbox.container()
    c.start_init()
    out, err = io.BytesIO(), io.BytesIO()
    pipeline = TapPipeline(
        Config(), resolve_targets([str(c.path)], []), True, True, "json", out, err
    )
    # Lines keep coming, so some are written after the probe is attached: the drain
    # thread only reads the ring when the kernel has put records in it.
    writer = c.python("import os, time\nwhile True:\n    os.write(1, b'never drained\\n')\n"
                      "    time.sleep(0.05)")
    try:
        assert asyncio.run(asyncio.wait_for(pipeline.run(), 60)) == 1
    finally:
        writer.kill()
        writer.wait(30)
    assert b"podtap: tapping" in err.getvalue()


def test_tap_started_before_the_first_process_keeps_streams_apart(
    sandbox: CgroupSandbox,
) -> None:
    """The tapped cgroup is empty at start: the stream identities are taken in the kernel
    at the first exec inside it, so a shell's `echo >&2` (dup2, then a write to fd 1)
    is still stderr, from the very first byte."""
    c = sandbox.container()
    tap = start_tap("--cgroup", str(c.path))
    try:
        script = "echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2"
        assert c.spawn(["/bin/sh", "-c", script]).wait(30) == 0
    finally:
        out, err = c.finish()
        stop_tap(tap)
    got = {s: "".join(o["message"] + "\n" for o in tap.objects if o["stream"] == s).encode()
           for s in ("stdout", "stderr")}
    assert got == {"stdout": out, "stderr": err} == {
        "stdout": b"out-1\nout-2\n", "stderr": b"err-1\nerr-2\n"
    }
