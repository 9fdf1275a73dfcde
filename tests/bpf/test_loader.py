"""The loader child and the agent's syscall path: the agent process never maps bcc or
LLVM, the child is gone after load(), the maps are driven through bpf(2), attaching is
holding perf event fds, and a program that does not build is a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.capture import bpfsys
from agent.capture.events import EV_DATA, Drainer, Record, RingReader, decode
from agent.capture.loader import map_names
from agent.capture.probe import BPF_DIR_ENV, CONTAINER_VALUE, Probe, ProbeError, bpf_dir
from agent.config import CaptureConfig
from simnode.containers import CgroupSandbox
from tests.kernel import REPO

pytestmark = pytest.mark.kernel

AGENT_SIDE = r"""
import json, os, sys
from agent.capture.probe import Probe
from agent.config import CaptureConfig

probe = Probe(CaptureConfig(ring_bytes=1 << 20))
probe.load()
probe.attach()
children = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == os.getpid():
            children.append(int(pid))
maps = open("/proc/self/maps").read()
print(json.dumps({
    "children": children,
    "bcc_mapped": [l for l in maps.splitlines() if "bcc" in l or "LLVM" in l or "clang" in l],
    "bcc_imported": [m for m in sys.modules if m == "bcc" or m.startswith("bcc.")],
    "attached": probe.attached,
    "ring_mappings": 0,
}))
probe.close()
"""


def test_agent_process_maps_no_bcc_and_the_loader_exits() -> None:
    proc = subprocess.run([sys.executable, "-c", AGENT_SIDE], capture_output=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["children"] == []  # the loader has exited (and was reaped)
    assert report["bcc_mapped"] == []
    assert report["bcc_imported"] == []
    assert "syscalls:sys_exit_write" in report["attached"]


def test_map_names_are_every_map_of_the_program() -> None:
    names = map_names(bpf_dir() / "podtap.c")
    assert {"containers", "counters", "events", "tails", "scratch"} <= set(names)
    assert len(names) == len(set(names))


def collect(probe: Probe) -> tuple[RingReader, Drainer, list[Record]]:
    records: list[Record] = []
    reader = RingReader(probe.ring_fd, probe.ring_size)
    drainer = Drainer(reader, lambda blob: records.extend(decode(blob)), 1 << 30,
                      linger_s=0.001)
    drainer.start()
    return reader, drainer, records


def wait_bytes(records: list[Record], cgroup_id: int, want: int) -> bytes:
    deadline = time.monotonic() + 60
    while True:
        got = b"".join(r[8] for r in list(records) if r[4] == EV_DATA and r[1] == cgroup_id)
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def test_maps_through_the_syscall_path(sandbox: CgroupSandbox) -> None:
    """watch() writes the containers map (read back with a lookup), capture is byte-exact,
    the per-CPU counters add up over the possible CPUs, unwatch() and detach() stop it."""
    probe = Probe(CaptureConfig(ring_bytes=1 << 20))
    probe.load()
    reader, drainer, records = collect(probe)
    try:
        c = sandbox.container()
        probe.watch(c.cgroup_id, c.stdout_ident, c.stderr_ident)
        containers = probe.map("containers")
        raw = bpfsys.map_lookup(containers.fd, c.cgroup_id.to_bytes(8, "little"),
                                containers.value_size)
        assert raw is not None
        out_ino, err_ino, out_dev, err_dev, flags, _ = CONTAINER_VALUE.unpack(raw)
        assert (out_ino, out_dev) == (c.stdout_ident.ino, c.stdout_ident.dev)
        assert (err_ino, err_dev) == (c.stderr_ident.ino, c.stderr_ident.dev)
        probe.attach()
        code = "import os\nfor i in range(3000): os.write(1, b'line %05d\\n' % i)"
        assert c.python(code).wait(60) == 0
        expected = b"".join(b"line %05d\n" % i for i in range(3000))
        assert wait_bytes(records, c.cgroup_id, len(expected)) == expected
        counters = probe.counters()
        assert counters["records"] == 3000 and counters["bytes"] == len(expected)

        probe.unwatch(c.cgroup_id)
        assert bpfsys.map_lookup(containers.fd, c.cgroup_id.to_bytes(8, "little"),
                                 containers.value_size) is None
        probe.unwatch(c.cgroup_id)  # already gone: no error
        assert c.python("import os; os.write(1, b'unwatched\\n')").wait(60) == 0
        probe.watch(c.cgroup_id, c.stdout_ident, c.stderr_ident)
        probe.detach()
        assert probe.attached == []
        assert c.python("import os; os.write(1, b'detached\\n')").wait(60) == 0
        probe.attach()
        assert c.python("import os; os.write(1, b'again\\n')").wait(60) == 0
        got = wait_bytes(records, c.cgroup_id, len(expected) + 6)
        out, _ = c.finish()
    finally:
        probe.detach()
        drainer.stop()
        drainer.join()
        reader.close()
        probe.close()
    assert got == expected + b"again\n"
    assert out == expected + b"unwatched\ndetached\nagain\n"


def test_possible_cpu_list_parsing() -> None:
    assert bpfsys.parse_cpu_list("0\n") == 1
    assert bpfsys.parse_cpu_list("0-1\n") == 2
    assert bpfsys.parse_cpu_list("0-3,8-11\n") == 12
    assert bpfsys.possible_cpus() >= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    "broken, message",
    [
        ("int exit_write(void *ctx) { return undeclared_thing; }\n", "undeclared_thing"),
        ("int exit_write(void *ctx) { return 0 }\n", "expected ';'"),
    ],
)
def test_a_program_that_does_not_build_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str, message: str
) -> None:
    shutil.copy(bpf_dir() / "podtap.h", tmp_path / "podtap.h")
    source = (bpf_dir() / "podtap.c").read_text()
    (tmp_path / "podtap.c").write_text(source + "\n" + broken.replace("exit_write", "broken"))
    monkeypatch.setenv(BPF_DIR_ENV, str(tmp_path))
    probe = Probe(CaptureConfig())
    started = time.monotonic()
    with pytest.raises(ProbeError) as info:
        probe.load()
    text = str(info.value)
    assert message in text, text
    assert "podtap.c" in text
    assert not probe.loaded
    assert time.monotonic() - started < 600


def test_a_program_the_verifier_rejects_is_a_clear_error() -> None:
    """A define that makes the copy loop unbounded for the verifier: bcc loads, the
    kernel refuses, and the error says which program."""
    probe = Probe(CaptureConfig(), defines={"MAX_ITERS": 1 << 20})
    with pytest.raises(ProbeError) as info:
        probe.load()
    assert "Failed to load BPF program b'copy_more'" in str(info.value), str(info.value)
    assert "processed" in str(info.value)  # the verifier log, from the child's stderr
    assert not probe.loaded
