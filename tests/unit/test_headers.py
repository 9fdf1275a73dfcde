"""Tests of agent.capture.headers: the shared kernel header cache.

Several agents share the cache (a hostPath): two during a rolling update, each one pid 1
of its own pid namespace. The concurrency test runs real processes in their own pid
namespaces (root, `unshare`); the ownership tests chown and chmod real directories (root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.capture.headers import (
    HeadersError,
    check_trusted_dir,
    find_kernel_headers,
    merge_debian_headers,
)
from tests.kernel import unavailable

REPO = Path(__file__).resolve().parents[2]
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
VERSION = "6.1.0-99"


@pytest.fixture(autouse=True)
def no_bcc_kernel_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)


def needs_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (pid namespaces, chown)")


def fake_debian_headers(usr_src: Path, files: int = 300) -> tuple[Path, Path]:
    """A Debian-style -common / -<arch> pair with enough files that merges overlap."""
    common = usr_src / f"linux-headers-{VERSION}-common"
    arch = usr_src / f"linux-headers-{VERSION}-{ARCH}"
    for i in range(files):
        f = common / "include" / "linux" / f"h{i // 50}" / f"f{i}.h"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"/* common {i} */\n")
    (common / "arch" / "x86").mkdir(parents=True)
    (arch / "include" / "generated").mkdir(parents=True)
    (arch / "include" / "generated" / "autoconf.h").write_text("/* arch */\n")
    (arch / "arch").mkdir()
    return common, arch


def assert_complete(tree: Path, common: Path, arch: Path) -> None:
    assert (tree / ".podtap-merged").is_file()
    assert (tree / "include" / "generated" / "autoconf.h").resolve() == (
        arch / "include" / "generated" / "autoconf.h"
    )
    linked = sorted(p.relative_to(tree) for p in tree.rglob("*.h"))
    expected = sorted(p.relative_to(common) for p in common.rglob("*.h")) + [
        Path("include/generated/autoconf.h")
    ]
    assert linked == sorted(expected)


MERGER = """
import os, sys, time, uuid
from pathlib import Path
from agent.capture.headers import merge_debian_headers
common, arch, dest, go = map(Path, sys.argv[1:5])
(go.parent / f"ready-{uuid.uuid4()}").touch()
while not go.exists():
    time.sleep(0.001)
print(os.getpid(), merge_debian_headers(common, arch, dest), flush=True)
"""


@pytest.mark.parametrize("stale", [False, True], ids=["empty-cache", "stale-unstamped-tree"])
def test_agents_with_the_same_pid_merge_into_one_cache_at_once(
    tmp_path: Path, stale: bool
) -> None:
    """Four agents, each pid 1 in its own pid namespace, merge at the same moment: each
    gets the complete tree, and no temporary or stale directory is left behind."""
    needs_root()
    unshare = shutil.which("unshare")
    if unshare is None:
        unavailable("needs unshare (util-linux)")
    common, arch = fake_debian_headers(tmp_path / "usr" / "src")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    dest = cache / f"{VERSION}-{ARCH}"
    if stale:  # an interrupted merge of an older agent: no stamp
        (dest / "include").mkdir(parents=True)
    go = tmp_path / "go"
    agents = [
        subprocess.Popen(
            [unshare, "--pid", "--fork", sys.executable, "-c", MERGER,
             str(common), str(arch), str(dest), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for _ in range(4)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(agents):  # all waiting for the go file
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents)
        time.sleep(0.01)
    go.touch()
    results = [a.communicate(timeout=120) for a in agents]
    for agent, (out, err) in zip(agents, results, strict=True):
        assert agent.returncode == 0, err.decode()
        pid, path = out.decode().split()
        assert (pid, path) == ("1", str(dest))  # the same pid everywhere
    assert_complete(dest, common, arch)
    assert sorted(p.name for p in cache.iterdir()) == [dest.name]


def test_merge_replaces_a_stale_tree_and_is_idempotent(tmp_path: Path) -> None:
    common, arch = fake_debian_headers(tmp_path / "src", files=20)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    dest = cache / "tree"
    (dest / "junk").mkdir(parents=True)
    assert merge_debian_headers(common, arch, dest) == dest
    assert_complete(dest, common, arch)
    assert not (dest / "junk").exists()
    assert merge_debian_headers(common, arch, dest) == dest
    assert sorted(p.name for p in cache.iterdir()) == ["tree"]


UNTRUSTED = {
    "group-writable": (0o775, 0, "writable by group or others"),
    "world-writable": (0o757, 0, "writable by group or others"),
    "owned-by-a-user": (0o755, 1000, "owned by uid 1000"),
}


@pytest.mark.parametrize("mode, uid, reason", UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_untrusted_cache_directory_is_refused(
    tmp_path: Path, mode: int, uid: int, reason: str
) -> None:
    needs_root()
    usr_src = tmp_path / "host" / "usr" / "src"
    fake_debian_headers(usr_src, files=5)
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, uid, 0)
    os.chmod(cache, mode)
    with pytest.raises(HeadersError, match=reason) as e:
        find_kernel_headers("0.0-none", cache_dir=str(cache), host_root=str(tmp_path / "host"))
    assert str(cache) in str(e.value) and "chmod go-w" in str(e.value)
    assert list(cache.iterdir()) == []  # nothing was built in it


def test_planted_trees_and_symlinks_are_refused(tmp_path: Path) -> None:
    needs_root()
    common, arch = fake_debian_headers(tmp_path / "src", files=5)
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(HeadersError, match="symlink"):
        check_trusted_dir(link)
    # A complete-looking tree someone else owns, in a trusted cache: not used.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    planted = cache / "tree"
    planted.mkdir()
    (planted / ".podtap-merged").write_text("")
    os.chown(planted, 1000, 1000)
    with pytest.raises(HeadersError, match="owned by uid 1000"):
        merge_debian_headers(common, arch, planted)


def test_missing_cache_directory_is_created_root_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        usr_src = tmp_path / "host" / "usr" / "src"
        common, arch = fake_debian_headers(usr_src, files=5)
        cache = tmp_path / "new" / "cache"
        found = find_kernel_headers(
            "0.0-none", cache_dir=str(cache), host_root=str(tmp_path / "host")
        )
    finally:
        os.umask(old)
    assert found.source == "debian"
    assert oct(cache.stat().st_mode & 0o777) == oct(0o755)
    assert_complete(Path(found.path), common, arch)
