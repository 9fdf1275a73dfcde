"""podtap's image, built for real (make image): what it holds, `podtap check` on this node,
and a byte-exact `podtap tap` of a host process from inside a privileged container."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture import host
from simnode.containers import CgroupSandbox
from tests.image.podman import (
    HOST_HEADERS,
    NODE_AGENT,
    PODMAN,
    image_under_test,
    podman_run,
    start_podman_tap,
)
from tests.kernel import REPO, stop_tap

pytestmark = pytest.mark.kernel

# Requirements every version of `podtap check` reports on (the full list: agent/capture/host.py).
CHECKS = ("kernel version", "kernel BTF", "privileges", "tracefs", "tracepoints",
          "cgroup v2", "bcc", "kernel headers for bcc")


@pytest.fixture(scope="module")
def image() -> str:
    return image_under_test()


@pytest.fixture
def header_cache(tmp_path: Path) -> Iterator[Path]:
    """The DaemonSet's header-cache hostPath."""
    yield tmp_path / "cache"


def test_entrypoint_is_podtap_and_default_command_is_run(image: str) -> None:
    out = subprocess.run(
        [*PODMAN, "image", "inspect", "--format",
         "{{json .Config.Entrypoint}}|{{json .Config.Cmd}}", image],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()
    entrypoint, cmd = (json.loads(part) for part in out.split("|"))
    assert entrypoint == ["podtap"]
    assert cmd == ["run"]


def test_version_is_the_repository_version(image: str) -> None:
    with open(Path(REPO) / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    proc = podman_run(image, ["version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"podtap {version}"


def test_nothing_only_needed_at_build_time_is_left(image: str) -> None:
    script = (
        "find /var/lib/apt/lists /root/.cache -mindepth 1 2>/dev/null; "
        "for c in gcc cc c++ clang make pip pip3; do command -v $c; done; true"
    )
    proc = podman_run(image, ["-c", script], options=["--entrypoint", "sh"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


def test_bundled_headers_and_bpf_program_are_in_place(image: str) -> None:
    script = ("ls -d /opt/podtap/kernel-headers/linux-headers-*-common/include/linux "
              "/opt/podtap/kernel-headers/linux-headers-*-amd64/include/generated "
              "/opt/podtap/bpf/podtap.c /opt/podtap/bpf/podtap.h")
    proc = podman_run(image, ["-c", script], options=["--entrypoint", "sh"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _check(image: str, options: tuple[str, ...], header_cache: Path) -> str:
    header_cache.mkdir(parents=True, exist_ok=True)
    proc = podman_run(
        image, ["check"], options=[*NODE_AGENT, *options, "-v", f"{header_cache}:/var/cache/podtap"]
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    results = [line for line in out.splitlines() if line.startswith("[")]
    assert len(results) == len(host.CHECKS), out  # the image is built from this repository
    assert not [line for line in results if line.startswith("[FAIL]")], out
    for name in CHECKS:
        assert re.search(rf"^\[(ok  |warn)\] [^:]*{re.escape(name)}", out, re.M), out
    assert re.search(rf"^{len(results)} passed.*, 0 failed$", out, re.M), out
    return out


def test_check_passes_with_the_hosts_headers_mounted(image: str, header_cache: Path) -> None:
    _check(image, HOST_HEADERS, header_cache)


def test_check_passes_with_only_the_bundled_headers(image: str, header_cache: Path) -> None:
    """A node without headers (no /lib/modules, /usr/src mounts): the image's own."""
    out = _check(image, (), header_cache)
    assert re.search(r"kernel headers for bcc: .*(Debian|debian)", out), out


def test_check_passes_when_the_hosts_usr_src_has_no_headers(
    image: str, header_cache: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "usr-src"
    empty.mkdir()
    _check(image, ("-v", f"{empty}:/usr/src:ro"), header_cache)


WORKLOAD = r"""
import os
os.write(1, b"first line\n")
for i in range(3000):
    os.write(1, b"line %d caf\xc3\xa9 \xe2\x82\xac\n" % i)
os.writev(2, [b"err part a ", b"part b\n", b"x" * 70000 + b"\n"])
os.write(1, b"y" * 200000 + b"\n")
os.write(2, b"\ttabs and \"quotes\" and \\backslashes\n")
os.write(1, b"no newline at exit")
"""


@pytest.mark.parametrize("select", ["cgroup", "pid"])
def test_tap_in_the_image_captures_a_host_process_byte_exact(
    image: str, header_cache: Path, select: str
) -> None:
    header_cache.mkdir(parents=True)
    box = CgroupSandbox()
    try:
        c = box.container()
        init = c.start_init()
        target = ["--cgroup", str(c.path)] if select == "cgroup" else ["--pid", str(init.pid)]
        tap = start_podman_tap(
            image, target,
            options=[*NODE_AGENT, *HOST_HEADERS, "-v", f"{header_cache}:/var/cache/podtap"],
        )
        try:
            assert c.python(WORKLOAD).wait(60) == 0
        finally:
            out, err = c.finish()
            stop_tap(tap, timeout=120)
    finally:
        box.cleanup()
    got: dict[str, str] = {"stdout": "", "stderr": ""}
    for (_pid, stream), text in sorted(tap.joined().items()):
        got["stdout" if stream == 1 else "stderr"] += text
    assert got["stdout"].encode() == out
    assert got["stderr"].encode() == err
    assert len(out) > 200000 and len(err) > 70000
    counters = tap.counters()
    assert counters["dropped_bytes"] == 0 and counters["truncated_bytes"] == 0
    if not Path(f"/lib/modules/{os.uname().release}/build/include").is_dir():
        # No host headers for this kernel: Debian's were merged into the header-cache hostPath.
        assert list(header_cache.glob("kernel-headers/*/.podtap-merged"))


def test_check_fails_with_remedies_where_the_pod_lacks_privileges(image: str) -> None:
    """What the init container shows on a node (or pod spec) that lacks something."""
    proc = podman_run(image, ["check"])  # no privileges, no host mounts
    assert proc.returncode == 1, proc.stdout
    failed = re.findall(r"^\[FAIL\] ([^:]+):", proc.stdout, re.M)
    assert "privileges" in failed and "tracefs" in failed
    assert proc.stdout.count("remedy:") == len(failed)
    assert re.search(rf", {len(failed)} failed$", proc.stdout, re.M)
