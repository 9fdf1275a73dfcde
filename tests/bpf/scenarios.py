"""Workloads run inside a test container, each standing for a class of writers.

A scenario starts its processes in the container, waits for them and returns
what the comparison must know beyond the ground truth (the pipe readers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simnode.containers import Container


@dataclass
class Expect:
    concurrent: bool = False  # several writers at once: compare per pid, bytes as a multiset
    absent: list[bytes] = field(default_factory=list)  # must appear in no capture
    per_pid: Callable[[bytes], bool] | None = None  # each pid's bytes must satisfy this
    outsiders: list[int] = field(default_factory=list)  # pids that must not appear


def py(c: Container, code: str) -> None:
    proc = c.python(code)
    assert proc.wait(120) == 0, f"writer failed: {code[:80]}"


def many_short_lines(c: Container) -> Expect:
    py(c, "import os\nfor i in range(5000): os.write(1, b'line %d of many\\n' % i)")
    return Expect()


def buffered_stdio(c: Container) -> Expect:
    # libc/CPython buffered output: big writes holding many lines, one partial at the end.
    py(c, "import sys\nfor i in range(20000): print('buffered', i, 'x' * (i % 97))")
    return Expect()


def partial_writes(c: Container) -> Expect:
    py(
        c,
        "import os, time\n"
        "for i in range(50):\n"
        "    os.write(1, b'par'); time.sleep(0.001)\n"
        "    os.write(1, b'tial li'); os.write(1, b'ne %d\\n' % i)\n"
        "    os.write(2, b'err-'); os.write(2, b'piece %d\\n' % i)\n",
    )
    return Expect()


def writev_many_iovecs(c: Container) -> Expect:
    # libuv gathers queued writes into one writev of up to IOV_MAX (1024) buffers.
    py(
        c,
        "import os, random\n"
        "rnd = random.Random(7)\n"
        "bufs = [(b'iov %d ' % i) + b'y' * rnd.randrange(0, 300) + (b'\\n' if i % 3 else b'')"
        " for i in range(1024)]\n"
        "bufs[5] = b''; bufs[500] = b''\n"
        "n = os.writev(1, bufs); assert n == sum(map(len, bufs)), n\n"
        "n = os.writev(2, [b'a', b'', b'b' * 70000, b'c\\n']); assert n == 70003, n\n"
        "n = os.writev(1, [b'x' * 40000] * 25 + [b'end\\n']); assert n == 1000004, n\n",
    )
    return Expect()


def pwritev2_writes(c: Container) -> Expect:
    # pwritev2 with offset -1 writes at the current position: it works on pipes.
    py(
        c,
        "import os\n"
        "for i in range(300):\n"
        "    os.pwritev(1 + i % 2, [b'pwritev2 ', b'line %d' % i, b'\\n'], -1, os.RWF_NOWAIT)\n",
    )
    return Expect()


def one_mib_write(c: Container) -> Expect:
    py(
        c,
        "import os, random\n"
        "rnd = random.Random(1)\n"
        "data = bytes(rnd.choice(b'abcdefghij\\n') for _ in range(1 << 20))\n"
        "assert os.write(1, data) == len(data)\n",
    )
    return Expect()


def nonblocking_partial_writes(c: Container) -> Expect:
    # A non-blocking pipe accepts only what fits: the capture must take exactly that.
    py(
        c,
        "import os, fcntl, select\n"
        "fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)\n"
        "data = b''.join(b'nb line %d\\n' % i for i in range(60000))\n"
        "view = memoryview(data)\n"
        "while view:\n"
        "    try: n = os.write(1, view[:300000])\n"
        "    except BlockingIOError: select.select([], [1], []); continue\n"
        "    view = view[n:]\n",
    )
    return Expect()


def stdout_stderr_mixed(c: Container) -> Expect:
    py(
        c,
        "import os\n"
        "for i in range(2000):\n"
        "    os.write(1 + i % 2, b'mixed %d on %s\\n' % (i, b'err' if i % 2 else b'out'))\n"
        "    if i % 7 == 0: os.write(1 + (i + 1) % 2, b'half-')\n"
        "os.write(1, b'\\n'); os.write(2, b'\\n')\n",
    )
    return Expect()


def concurrent_partial_lines(c: Container) -> Expect:
    code = (
        "import os, sys, time\n"
        "tag = sys.argv[1].encode()\n"
        "for i in range(300):\n"
        "    os.write(1, tag + b'%d-' % i); time.sleep(0.0003)\n"
        "    os.write(1, b'mid-'); os.write(1, b'end ' + tag + b'\\n')\n"
    )
    procs = [c.spawn([sys.executable, "-c", code, tag]) for tag in ("A", "B", "C")]
    for p in procs:
        assert p.wait(60) == 0

    def one_writer(data: bytes) -> bool:
        tag = data[:1]
        expected = b"".join(tag + b"%d-mid-end " % i + tag + b"\n" for i in range(300))
        return data == expected

    return Expect(concurrent=True, per_pid=one_writer)


def dev_stdout_new_fd(c: Container) -> Expect:
    # nginx-style: the log "file" is /dev/stdout, opened as a new fd (and dup'ed ones).
    py(
        c,
        "import os\n"
        "fd = os.open('/dev/stdout', os.O_WRONLY); assert fd > 2\n"
        "ed = os.open('/dev/stderr', os.O_WRONLY)\n"
        "d = os.dup(1)\n"
        "for i in range(100):\n"
        "    os.write(fd, b'via /dev/stdout fd %d line %d\\n' % (fd, i))\n"
        "    os.write(ed, b'via /dev/stderr line %d\\n' % i)\n"
        "    os.write(d, b'via dup line %d\\n' % i)\n",
    )
    return Expect()


def fd1_redirected_to_file(c: Container) -> Expect:
    with tempfile.NamedTemporaryFile(prefix="podtap-redirect-") as f:
        proc = c.spawn(
            [
                "/bin/sh",
                "-c",
                'echo before; exec 3>&1 1>"$0"; echo hidden-in-file; echo to-stderr >&2; '
                "echo back >&3",
                f.name,
            ]
        )
        assert proc.wait(30) == 0
        assert b"hidden-in-file" in Path(f.name).read_bytes()
    return Expect(absent=[b"hidden-in-file"])


def shell_pipeline(c: Container) -> Expect:
    proc = c.spawn(["/bin/sh", "-c", "seq 1 20000 | grep -v 7 | sed 's/^/stage3 /'"])
    assert proc.wait(60) == 0
    return Expect(absent=[b"\n17\n"])


def short_lived_no_newline(c: Container) -> Expect:
    for i in range(15):
        proc = c.spawn(["/bin/sh", "-c", f"printf 'short-lived {i} ends without newline'"])
        assert proc.wait(30) == 0
    return Expect()


def non_utf8_bytes(c: Container) -> Expect:
    py(
        c,
        "import os, random\n"
        "rnd = random.Random(3)\n"
        "os.write(1, b'bad \\xff\\xfe and \\xc3\\x28 then good \\xc3\\xa9 \\xe2\\x82\\xac\\n')\n"
        "for i in range(200):\n"
        "    os.write(1, bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 80))).replace"
        "(b'\\n', b'') + b'\\n')\n"
        "os.write(2, b'\\x00nul\\x00 and \\x1b[31mansi\\x1b[0m\\n')\n",
    )
    return Expect()


OUTSIDER_CODE = "import os\nfor i in range(3000): os.write(1, b'OUTSIDER %d\\n' % i)"


def outsider_writes_meanwhile(c: Container) -> Expect:
    outsider = subprocess.Popen(
        [sys.executable, "-c", OUTSIDER_CODE],
        stdout=subprocess.PIPE,
    )
    py(c, "import os\nfor i in range(3000): os.write(1, b'insider %d\\n' % i)")
    out, _ = outsider.communicate(timeout=60)
    assert out.count(b"OUTSIDER") == 3000
    return Expect(absent=[b"OUTSIDER"], outsiders=[outsider.pid])


def forked_children(c: Container) -> Expect:
    # A process tree: children inherit the streams and the cgroup.
    py(
        c,
        "import os\n"
        "for k in range(4):\n"
        "    if os.fork() == 0:\n"
        "        for i in range(200): os.write(1, b'child %d line %d\\n' % (k, i))\n"
        "        os._exit(0)\n"
        "    os.wait()\n",
    )
    return Expect()


SCENARIOS: dict[str, Callable[[Container], Expect]] = {
    f.__name__: f
    for f in (
        many_short_lines,
        buffered_stdio,
        partial_writes,
        writev_many_iovecs,
        pwritev2_writes,
        one_mib_write,
        nonblocking_partial_writes,
        stdout_stderr_mixed,
        concurrent_partial_lines,
        dev_stdout_new_fd,
        fd1_redirected_to_file,
        shell_pipeline,
        short_lived_no_newline,
        non_utf8_bytes,
        outsider_writes_meanwhile,
        forked_children,
    )
}

assert os.path.exists("/bin/sh")
