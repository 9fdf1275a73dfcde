"""Tests of agent.capture.host and `podtap check`: it checks what the program uses, and
changes nothing on the node.

The tracefs test runs `podtap check` in a private mount namespace without tracefs
(root, `unshare`); the others use fake tracefs trees, BTF string tables and C sources.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.capture.host import (
    HOOKS,
    bpf_source_dir,
    check_bpf_features,
    check_kernel,
    check_tracefs,
    check_tracepoints,
    program_needs,
    read_program_needs,
)
from tests.kernel import unavailable

REPO = Path(__file__).resolve().parents[2]


# --- the hooks are the program's ---------------------------------------------------------

TAIL_CALLED = {"copy_more"}  # loaded for the tail-call array, never attached


def test_hooks_name_the_programs_of_podtap_c() -> None:
    programs = read_program_needs().programs
    attached = {h.program for h in HOOKS}
    assert attached <= programs, attached - programs
    assert programs - TAIL_CALLED == attached, programs - TAIL_CALLED - attached
    assert (bpf_source_dir() / "podtap.c").read_text().count("tails.call(") >= 1


def test_probe_attaches_exactly_the_hooks() -> None:
    """One list: the probe uses HOOKS, or at least names the same tracepoints."""
    source = (REPO / "agent" / "capture" / "probe.py").read_text()
    if re.search(r"\bHOOKS\b", source):
        return
    named = set(re.findall(r'"((?:syscalls|sched|cgroup):\w+)"', source))
    assert named == {h.tracepoint for h in HOOKS}


def test_required_hooks_include_exec_and_cgroup_mkdir_and_no_enter_tracepoints() -> None:
    required = {h.tracepoint for h in HOOKS if h.required}
    assert {"sched:sched_process_exec", "cgroup:cgroup_mkdir"} <= required
    assert not [h for h in HOOKS if ":sys_enter_" in h.tracepoint]


# --- tracepoints ---------------------------------------------------------------------------


def fake_tracefs(root: Path, tracepoints: list[str]) -> str:
    for tp in tracepoints:
        (root / "events" / Path(*tp.split(":"))).mkdir(parents=True)
    return str(root)


ALL = [h.tracepoint for h in HOOKS]


def test_every_used_tracepoint_present_passes_without_sys_enter(tmp_path: Path) -> None:
    result = check_tracepoints(fake_tracefs(tmp_path, ALL))
    assert result.ok and not result.warning, result
    assert str(len(HOOKS)) in result.detail


@pytest.mark.parametrize(
    "absent", [h.tracepoint for h in HOOKS if h.required], ids=lambda tp: tp.split(":")[1]
)
def test_a_missing_required_tracepoint_fails(tmp_path: Path, absent: str) -> None:
    result = check_tracepoints(fake_tracefs(tmp_path, [tp for tp in ALL if tp != absent]))
    assert not result.ok
    assert absent in result.detail and result.remedy


@pytest.mark.parametrize(
    "absent", [h.tracepoint for h in HOOKS if not h.required], ids=lambda tp: tp.split(":")[1]
)
def test_a_missing_optional_tracepoint_is_a_warning(tmp_path: Path, absent: str) -> None:
    result = check_tracepoints(fake_tracefs(tmp_path, [tp for tp in ALL if tp != absent]))
    assert result.ok and result.warning
    assert f"not covered: {absent}" in result.detail


# --- tracefs: reported, never mounted ------------------------------------------------------


MOUNTINFO = (
    "22 1 0:21 / /proc rw - proc proc rw\n"
    "{tracefs}"
    "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
)


def mountinfo(tmp_path: Path, *tracefs_points: str) -> str:
    lines = "".join(f"4{i} 25 0:1{i} / {p} rw - tracefs tracefs rw\n"
                    for i, p in enumerate(tracefs_points))
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO.format(tracefs=lines))
    return str(path)


def test_tracefs_is_found_in_the_mount_table(tmp_path: Path) -> None:
    table = mountinfo(tmp_path, "/host/tracing", "/sys/kernel/debug/tracing")
    assert check_tracefs(table).detail == "/sys/kernel/debug/tracing"
    assert check_tracefs(mountinfo(tmp_path, "/host/tracing")).detail == "/host/tracing"


def test_unmounted_tracefs_is_reported_not_mounted(tmp_path: Path) -> None:
    table = mountinfo(tmp_path)
    before = Path("/proc/self/mountinfo").read_text()
    result = check_tracefs(table)
    assert Path("/proc/self/mountinfo").read_text() == before
    if os.geteuid() == 0:
        assert result.ok and result.warning and "will mount" in result.detail
    no_tracefs = tmp_path / "filesystems"
    no_tracefs.write_text("nodev\tproc\n")
    assert not check_tracefs(table, str(no_tracefs)).ok


UNMOUNT_TRACEFS_AND_CHECK = r"""
set -e
tracefs_mounts() {
    awk -F ' - ' '{ split($2, fs, " "); split($1, f, " ");
                    if (fs[1] == "tracefs") print f[5] }' /proc/self/mountinfo
}
for m in $(tracefs_mounts | sort -r); do umount -l "$m"; done
test -z "$(tracefs_mounts)"
"$@"
echo "tracefs mounts after check: $(tracefs_mounts | wc -l)"
"""


def test_podtap_check_does_not_mount_tracefs() -> None:
    """`podtap check` on a node without tracefs mounted (a private mount namespace):
    it says podtap run will mount it, and leaves it unmounted."""
    if os.geteuid() != 0:
        unavailable("needs root for a private mount namespace")
    unshare = shutil.which("unshare")
    if unshare is None:
        unavailable("needs unshare (util-linux)")
    done = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c",
         UNMOUNT_TRACEFS_AND_CHECK, "sh", sys.executable, "-m", "agent.cli", "check"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    out = done.stdout
    assert "tracefs mounts after check: 0" in out, out + done.stderr
    assert "[warn] tracefs: not mounted: podtap run will mount it" in out, out
    assert "[warn] tracepoints: not checked" in out, out


# --- the kernel the program can load on ----------------------------------------------------


def test_minimum_kernel_comes_from_the_helpers_used() -> None:
    needs = read_program_needs()
    assert "bpf_task_pt_regs" in needs.helpers
    assert needs.min_kernel() == ((5, 15), ["bpf_task_pt_regs"])


@pytest.mark.parametrize(
    ("release", "ok"),
    [("5.8.0-63-generic", False), ("5.10.209", False), ("5.14.21", False),
     ("5.15.0-1", True), ("6.1.0-18-amd64", True)],
)
def test_kernel_older_than_the_program_fails(release: str, ok: bool) -> None:
    result = check_kernel(release)
    assert result.ok is ok, result
    assert "5.15" in result.detail and "bpf_task_pt_regs" in result.detail
    if not ok:
        assert "5.15" in result.remedy


SOURCE = """
/* bpf_task_pt_regs() is only named in this comment */
BPF_RINGBUF_OUTPUT(events, 8);
BPF_TABLE("lru_hash", u32, u8, lost, 16);
int on_exec(void *ctx) {
    u64 id = bpf_get_current_pid_tgid(); // bpf_get_current_task_btf() too
    events.ringbuf_output(&id, sizeof(id), 0);
    return 0;
}
"""


def test_program_needs_are_parsed_from_code_not_comments() -> None:
    needs = program_needs(SOURCE)
    assert needs.programs == {"on_exec"}
    assert needs.helpers == {"bpf_get_current_pid_tgid", "bpf_ringbuf_output"}
    assert needs.map_types == {"ringbuf", "lru_hash"}
    assert needs.min_kernel() == ((5, 8), ["bpf_ringbuf_output", "map type ringbuf"])
    assert check_kernel("5.8.0", needs).ok


def test_a_helper_unknown_to_check_fails_it() -> None:
    needs = program_needs(SOURCE.replace("bpf_get_current_pid_tgid", "bpf_new_helper"))
    result = check_kernel("6.18", needs)
    assert not result.ok and "bpf_new_helper" in result.detail


def btf_strings(tmp_path: Path, names: list[str]) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\0" + b"\0".join(n.encode() for n in names) + b"\0")
    return str(path)


def test_helpers_and_map_types_missing_from_the_kernels_btf_fail(tmp_path: Path) -> None:
    needs = read_program_needs()
    names = [f"BPF_FUNC_{h.removeprefix('bpf_')}" for h in needs.helpers]
    names += [f"BPF_MAP_TYPE_{m.upper()}" for m in needs.map_types]
    assert check_bpf_features(btf_strings(tmp_path, names), needs).ok
    without = [n for n in names if n not in ("BPF_FUNC_task_pt_regs", "BPF_MAP_TYPE_RINGBUF")]
    # A prefix of a name is not the name.
    without.append("BPF_FUNC_task_pt_regs_extra")
    result = check_bpf_features(btf_strings(tmp_path, without), needs)
    assert not result.ok
    assert result.detail == "missing: bpf_task_pt_regs, map type ringbuf"


def test_this_kernel_has_what_the_program_uses() -> None:
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        unavailable("no BTF")
    assert check_bpf_features().ok
