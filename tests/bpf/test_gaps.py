"""Gaps in the real kernel: every lost byte is counted and ends its line, never glued.

Each test loads its own program (a tiny ring buffer, a small max_write, a scratch array
too small for the CPUs...) and takes the records through `LineAssembler.process`, as
the pipeline does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.capture import bpfsys
from agent.capture.btf import Btf
from agent.capture.events import Drainer, Record, RingReader, decode
from agent.capture.host import Hook, tracefs_dir
from agent.capture.probe import CONSTANTS, Probe, tracepoint_offsets
from agent.config import CaptureConfig
from agent.lines import Line, LineAssembler
from simnode.containers import CgroupSandbox, Container
from tests.kernel import unavailable

pytestmark = pytest.mark.kernel

EV_DATA = CONSTANTS["EV_DATA"]
EV_EXIT = CONSTANTS["EV_EXIT"]
EV_THREAD_EXIT = CONSTANTS["EV_THREAD_EXIT"]
F_LOSS = CONSTANTS["F_LOSS"]
F_TRUNCATED = CONSTANTS["F_TRUNCATED"]

# Programs these tests need attached beyond what the loader attaches (no-op once it does).
EXTRA_PROGRAMS = (
    ("syscalls:sys_exit_sendmmsg", "exit_sendmmsg"),
    ("syscalls:sys_exit_pwritev", "exit_writev"),
    ("syscalls:sys_exit_io_submit", "exit_io_uring"),
)


def exit_defines(use_tracepoint: bool = True) -> dict[str, int]:
    """How the exit program tells a process's end from a thread's, on this kernel: the
    tracepoint's group_dead field (kernels >= 6.16), else signal->live from BTF."""
    tracefs = tracefs_dir()
    fields = tracepoint_offsets(tracefs, "sched", "sched_process_exit") if tracefs else {}
    if use_tracepoint and "group_dead" in fields:
        return {"TP_EXIT_GROUP_DEAD": fields["group_dead"]}
    btf = Btf.load("/sys/kernel/btf/vmlinux")
    return {
        "OFF_TASK_SIGNAL": btf.member_offset("task_struct", "signal"),
        "OFF_SIGNAL_LIVE": btf.member_offset("signal_struct", "live"),
    }


@dataclass
class Run:
    probe: Probe
    container: Container
    records: list[Record] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reader: RingReader | None = None
    delivered: int = 0  # ring bytes handed over by the drain thread

    def deliver(self, blob: bytes) -> None:
        with self._lock:
            self.records += decode(blob)
            self.delivered += len(blob)

    def sync(self) -> list[Record]:
        """Every record committed so far (the ring drained), of this container."""
        assert self._reader is not None
        target = self._reader.producer_pos()  # everything reserved so far, handed over
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self._lock:
                if self.delivered >= target:
                    break
            time.sleep(0.005)
        with self._lock:
            return [r for r in self.records if r[1] == self.container.cgroup_id]

    def counters(self) -> dict[str, int]:
        return self.probe.counters()


@contextmanager
def running(
    sandbox: CgroupSandbox,
    defines: dict[str, int] | None = None,
    sockets: bool = False,
    exits: dict[str, int] | None = None,
    **cfg: int,
) -> Iterator[Run]:
    exits = exit_defines() if exits is None else exits
    probe = Probe(
        CaptureConfig(**cfg),  # type: ignore[arg-type]
        defines={**exits, **(defines or {})},
        extra_hooks=[Hook(tp, fn, False) for tp, fn in EXTRA_PROGRAMS],
    )
    probe.load()
    try:
        c = sandbox.container(sockets=sockets)
        probe.watch(c.cgroup_id, c.stdout_ident, c.stderr_ident)
        run = Run(probe, c)
        run._reader = RingReader(probe.ring_fd, probe.ring_size)
        drainer = Drainer(run._reader, run.deliver, max_pending=1 << 40, linger_s=0.002)
        drainer.start()
        probe.attach()
        try:
            yield run
        finally:
            probe.detach()
            drainer.stop()
            drainer.join()
            run._reader.close()
    finally:
        probe.close()


def lines_of(records: list[Record]) -> list[Line]:
    out: list[Line] = []
    LineAssembler(idle_timeout_ns=1 << 62).process(records, out)
    return out


def messages(lines: list[Line]) -> list[tuple[int, bytes, bool]]:
    return [(line[2], line[4], line[5]) for line in lines]


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# --------------------------------------------------------------------------- item 1


BLOCK = 256  # = the chunk size below: every record holds exactly one block


def block_writer(writes: int) -> str:
    """Each write: 3 blocks `s:wwwwww:k:...` (stream, write number, block) ending in \\n,
    alternating stdout and stderr; a record's block id tells where it sits in its stream."""
    return (
        "import os\n"
        f"for w in range({writes}):\n"
        "    for s in (1, 2):\n"
        "        blocks = [(b'%d:%06d:%d:' % (s, w, k)).ljust(255, b'.') for k in range(3)]\n"
        "        os.write(s, b'.'.join(blocks) + b'\\n')\n"
    )


def test_loss_flag_marks_exactly_the_gaps_of_each_stream(sandbox: CgroupSandbox) -> None:
    """A 4 KiB ring drained slowly: writes of 3 chunks, both streams.  A record carries
    F_LOSS exactly when bytes of its own stream were dropped since that stream's previous
    record: never on the other stream, never twice for one gap."""
    with running(sandbox, ring_bytes=4096, chunk=BLOCK) as run:
        assert run.container.python(block_writer(3000)).wait(300) == 0
        records = [r for r in run.sync() if r[4] == EV_DATA]
        counters = run.counters()
    assert counters["drop_records"] > 0, "the tiny ring must drop"
    assert len(records) > 100, "and keep some"
    last: dict[int, int] = {}
    wrong = []
    for r in records:
        s, w, k = (int(x) for x in r[8][:12].split(b":")[:3])
        assert s == r[5] and len(r[8]) == BLOCK
        index = w * 3 + k
        gap = index != last.get(s, -1) + 1
        if gap != bool(r[6] & F_LOSS):
            wrong.append((s, last.get(s), index, r[6]))
        last[s] = index
    assert not wrong, f"{len(wrong)} records with a wrong loss flag, e.g. {wrong[:5]}"
    # And the lines: consecutive blocks of one write, never of two; a complete line ends
    # with the write's last block (its head may be lost: then it starts after the gap).
    for stream, msg, partial in messages(lines_of(records)):
        seg = msg if partial else msg + b"\n"
        ids = [
            tuple(int(x) for x in seg[i : i + 12].split(b":")[:3])
            for i in range(0, len(seg), BLOCK)
        ]
        assert len(seg) % BLOCK == 0 and {i[:2] for i in ids} == {(stream, ids[0][1])}, ids
        assert [i[2] for i in ids] == list(range(ids[0][2], ids[0][2] + len(ids)))
        assert partial or ids[-1][2] == 2


@pytest.mark.parametrize("chunk", [16384, 4096, 1024])
def test_write_truncated_at_max_write_ends_its_line(sandbox: CgroupSandbox, chunk: int) -> None:
    with running(sandbox, max_write=4096, chunk=chunk) as run:
        code = "import os\nos.write(1, b'A' * 5000 + b'\\n')\nos.write(1, b'B\\n')"
        assert run.container.python(code).wait(60) == 0
        records = run.sync()
        counters = run.counters()
    data = [r for r in records if r[4] == EV_DATA]
    assert any(r[6] & F_TRUNCATED for r in data)
    assert messages(lines_of(records)) == [(1, b"A" * 4096, True), (1, b"B", False)]
    assert counters["trunc_bytes"] == 5001 - 4096


def test_failed_tail_call_is_counted_and_ends_the_line(
    sandbox: CgroupSandbox, tmp_path: Path
) -> None:

    code = (
        "import os, time\n"
        f"d = {str(tmp_path)!r}\n"
        "def step(name):\n"
        "    open(os.path.join(d, 'done-' + name), 'w').close()\n"
        "    while not os.path.exists(os.path.join(d, 'go-' + name)): time.sleep(0.01)\n"
        "os.write(1, b'xyz'); step('1')\n"
        "os.write(1, b'abc'); step('2')\n"
        "os.write(1, b'def\\n')\n"
    )
    with running(sandbox) as run:
        tails = run.probe.map("tails").fd
        copy_more = run.probe.program_fd("copy_more")
        proc = run.container.python(code)
        wait_for(tmp_path / "done-1")
        bpfsys.map_delete(tails, (0).to_bytes(4, "little"))  # the next tail call fails
        (tmp_path / "go-1").touch()
        wait_for(tmp_path / "done-2")
        bpfsys.map_update(tails, (0).to_bytes(4, "little"), copy_more.to_bytes(4, "little"))
        (tmp_path / "go-2").touch()
        assert proc.wait(60) == 0
        records = run.sync()
        counters = run.counters()
    assert counters["tail_fail_bytes"] == 3
    assert messages(lines_of(records)) == [(1, b"xyz", True), (1, b"def", False)]


# --------------------------------------------------------------------------- item 6


def test_scratch_miss_on_a_cpu_beyond_ncpus_is_counted_and_ends_the_line(
    sandbox: CgroupSandbox,
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or cpus[0] != 0:
        unavailable("needs CPUs 0 and another one")
    other = cpus[1]
    code = (
        "import os\n"
        "os.sched_setaffinity(0, {0}); os.write(1, b'head')\n"
        f"os.sched_setaffinity(0, {{{other}}}); os.write(1, b'lost\\n')\n"
        "os.sched_setaffinity(0, {0}); os.write(1, b'tail\\n')\n"
    )
    with running(sandbox, {"NCPUS": 1}) as run:
        assert run.container.python(code).wait(60) == 0
        records = run.sync()
        counters = run.counters()
    assert counters["scratch_miss"] == 1 and counters["scratch_miss_bytes"] == 5
    assert messages(lines_of(records)) == [(1, b"head", True), (1, b"tail", False)]


SENDMMSG = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class IOV(ctypes.Structure):
    _fields_ = [("base", ctypes.c_char_p), ("len", ctypes.c_size_t)]
class MSG(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(IOV)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class MMSG(ctypes.Structure):
    _fields_ = [("hdr", MSG), ("len", ctypes.c_uint)]
assert ctypes.sizeof(MMSG) == 64
texts = [b"first mmsg\\n", b"second one\\n", b"third\\n"]
iovs = [IOV(t, len(t)) for t in texts]
vec = (MMSG * 3)()
for i, iov in enumerate(iovs):
    vec[i].hdr.iov = ctypes.pointer(iov); vec[i].hdr.iovlen = 1
os.write(1, b"pre ")
n = libc.sendmmsg(1, vec, 3, 0)
assert n == 3, ctypes.get_errno()
os.write(1, b"post\\n")
"""


def test_sendmmsg_is_counted_to_the_byte_and_ends_the_line(sandbox: CgroupSandbox) -> None:
    with running(sandbox, sockets=True) as run:
        before = run.counters()
        assert run.container.python(SENDMMSG).wait(60) == 0
        records = run.sync()
        after = run.counters()
    sent = len(b"first mmsg\nsecond one\nthird\n")
    assert after["uncapt_bytes"] - before["uncapt_bytes"] == sent
    assert after["uncapt_msgs"] - before["uncapt_msgs"] == 3
    assert messages(lines_of(records)) == [(1, b"pre ", True), (1, b"post", False)]


def test_uncapturable_splice_ends_the_line(sandbox: CgroupSandbox) -> None:
    code = (
        "import os\n"
        "r, w = os.pipe(); os.write(w, b'spliced\\n')\n"
        "os.write(1, b'before ')\n"
        "assert os.splice(r, 1, 8) == 8\n"
        "os.write(1, b'after\\n')\n"
    )
    with running(sandbox) as run:
        assert run.container.python(code).wait(60) == 0
        records = run.sync()
    assert messages(lines_of(records)) == [(1, b"before ", True), (1, b"after", False)]


# --------------------------------------------------------------------------- item 7


THREADS = """
import ctypes, os, threading, time
libc = ctypes.CDLL(None)
def short():
    os.write(1, b"thread partial")
def state(tid):
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
def worker():
    os.write(1, b"abc")
    started.set()
    while state(os.getpid()) != "Z":  # until the main thread has exited
        time.sleep(0.005)
    os.write(1, b"def\\n")
    os.write(2, b"worker's last words")
t = threading.Thread(target=short); t.start(); t.join()
while state(t.native_id) != "gone":  # its exit (and exit record) is over
    time.sleep(0.005)
started = threading.Event()
threading.Thread(target=worker).start()
started.wait()
libc.syscall(60, 0)  # exit(2): the main thread only, the process lives on
"""


@pytest.mark.parametrize("use_tracepoint", [True, False], ids=["group_dead", "signal_live"])
def test_exits_end_lines_when_the_writer_is_gone_not_before(
    sandbox: CgroupSandbox, use_tracepoint: bool
) -> None:
    """A thread that exits ends the line it wrote last; the main thread exiting first does
    not end the process's lines; the last thread's exit does (no idle wait)."""
    with running(sandbox, exits=exit_defines(use_tracepoint)) as run:
        proc = run.container.python(THREADS)
        assert proc.wait(60) == 0
        records = run.sync()
    exits = [r for r in records if r[4] in (EV_EXIT, EV_THREAD_EXIT)]
    assert [r[4] for r in exits][-1] == EV_EXIT
    assert sum(r[4] == EV_EXIT for r in exits) == 1
    assert exits[-1][3] != exits[-1][2], "the process ended with its last (non-main) thread"
    assert messages(lines_of(records)) == [
        (1, b"thread partial", True),
        (1, b"abcdef", False),
        (2, b"worker's last words", True),
    ]
