"""What podtap's probe adds to the write() of a process it does not watch: every other
process of the node (run as root; prints figures).

Timing whole write() calls into a pipe varies by hundreds of ns between runs on a shared
VM: too much to see a few ns.  So two measurements, each as precise as it can be:

- wall: a C writer's CPU time per write(100 B) to /dev/null (no reader to wake), in rounds
  that alternate no probe / an empty program on each of podtap's tracepoints / podtap as
  `podtap run` loads it (the pods' subtree known, the writer outside it); the median of
  the paired differences.  This gives what the tracepoints themselves cost (the empty
  programs' added ns), the denominator of the goal "podtap ≤ +10 % over empty programs".
- body: the kernel's own BPF statistics (`kernel.bpf_stats_enabled`: run_time_ns and
  run_cnt of a program) of podtap's `sys_exit_write` program and of reference programs on
  the same tracepoint: empty, only `bpf_get_current_cgroup_id()`, and that plus an array
  lookup (the least any cgroup filter does).  The stats' own clock reads inflate every
  program alike, so only differences are reported.

    python bench/probe_cost.py [--calls N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.capture.headers import find_kernel_headers  # noqa: E402
from agent.capture.host import ensure_tracefs  # noqa: E402
from agent.capture.probe import PodsRoot, Probe  # noqa: E402
from agent.config import CaptureConfig  # noqa: E402
from bench.write_cost import COST_WRITER_C, build_writer  # noqa: E402
from simnode.containers import CgroupSandbox  # noqa: E402

STATS = "/proc/sys/kernel/bpf_stats_enabled"
REFERENCE_BPF = """
BPF_ARRAY(slots, u8, 65536);
int empty(void *ctx) { return 0; }
int cgroup_id_only(void *ctx) { return bpf_get_current_cgroup_id() == 1; }
int cgroup_filter(void *ctx) {
    u32 slot = (u32)bpf_get_current_cgroup_id() & 65535;
    u8 *hit = slots.lookup(&slot);
    return hit && *hit;
}
"""
REFERENCES = ("empty", "cgroup_id_only", "cgroup_filter")
VARIANTS = (("write", 0), ("writev", 1))


def run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind `fd`."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    )
    return int(fields["run_time_ns"]), int(fields["run_cnt"])


class Writer:
    """The C writer, writing `calls` times 100 bytes to /dev/null; ns of CPU per call."""

    def __init__(self, tmp: str, calls: int) -> None:
        self.exe = build_writer(tmp, COST_WRITER_C, "cost")
        self.result, self.calls = Path(tmp, "result"), calls

    def ns_per_call(self, vec: int) -> float:
        with open(os.devnull, "wb") as null:
            proc = subprocess.run([self.exe, "100", str(vec), str(self.calls), str(self.result)],
                                  stdout=null, check=False)
        if proc.returncode != 0:
            raise RuntimeError("the cost writer failed")
        return float(self.result.read_text())


class Tracepoints:
    """Attach one program of a bcc object to a list of tracepoints, and detach it."""

    def __init__(self, bpf: Any, tracepoints: list[str]) -> None:
        self.bpf, self.tracepoints, self.attached = bpf, tracepoints, []

    def attach(self, fn: str) -> list[str]:
        for tp in self.tracepoints:
            try:
                self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
                self.attached.append(tp)
            except Exception:  # noqa: BLE001 (an optional tracepoint this kernel lacks)
                continue
        return list(self.attached)

    def detach(self) -> None:
        for tp in self.attached:
            self.bpf.detach_tracepoint(tp=tp.encode())
        self.attached = []


def wall_rounds(writer: Writer, empty: Tracepoints, probe: Probe, rounds: int
                ) -> dict[str, dict[str, list[float]]]:
    """ns per call of each variant under each condition, the conditions taking turns."""
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for condition in ("no probe", "empty programs", "podtap, unwatched"):
            if condition == "empty programs":
                empty.attach("empty")
            elif condition == "podtap, unwatched":
                probe.attach()
            for name, vec in VARIANTS:
                samples.setdefault(name, {}).setdefault(condition, []).append(
                    writer.ns_per_call(vec))
            empty.detach()
            if probe.attached:
                probe.detach()
    return samples


def body_rounds(writer: Writer, bpf: Any, probe: Probe, rounds: int
                ) -> dict[str, dict[str, list[float]]]:
    """ns per run (kernel stats) of podtap's program on each variant's exit tracepoint and
    of the references on the same tracepoint, by variant."""
    fds = {name: bpf.load_func(name.encode(), bpf.TRACEPOINT).fd for name in REFERENCES}
    runs: dict[str, dict[str, list[float]]] = {}
    before = Path(STATS).read_text().strip()
    Path(STATS).write_text("1\n")
    try:
        for _ in range(rounds):
            for variant, vec in VARIANTS:
                one = Tracepoints(bpf, [f"syscalls:sys_exit_{variant}"])
                for name in (*REFERENCES, "podtap"):
                    if name == "podtap":
                        probe.attach()
                        fd = probe.program_fd(f"exit_{variant}")
                    else:
                        one.attach(name)
                        fd = fds[name]
                    t0, n0 = run_stats(fd)
                    writer.ns_per_call(vec)
                    t1, n1 = run_stats(fd)
                    runs.setdefault(variant, {}).setdefault(name, []).append(
                        (t1 - t0) / max(n1 - n0, 1))
                    one.detach()
                    if probe.attached:
                        probe.detach()
    finally:
        Path(STATS).write_text(before + "\n")
    return runs


def paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x - y for x, y in zip(a, b, strict=True))


def unwatched_cost(rounds: int = 15, calls: int = 200_000) -> dict[str, Any]:
    """The figures of this script, as a dict (bench/page.py puts them on the page)."""
    ensure_tracefs()
    os.environ["BCC_KERNEL_SOURCE"] = find_kernel_headers().path
    from bcc import BPF

    box = CgroupSandbox(prefix="podtap-bench")
    probe: Probe | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            writer = Writer(tmp, calls)
            refs = BPF(text=REFERENCE_BPF)
            # As `podtap run` loads it: the pods' subtree (a sandbox cgroup) is known and
            # the writer (this script's cgroup) is outside it; podtap watches a container.
            pods = box.container("kubepods").path
            probe = Probe(CaptureConfig(ring_bytes=1 << 20), PodsRoot(pods.stat().st_ino, 2))
            probe.load()
            probe.watch(box.container("kubepods/watched").path.stat().st_ino)
            empty = Tracepoints(refs, [hook.tracepoint for hook in probe.hooks])
            wall = wall_rounds(writer, empty, probe, rounds)
            body = body_rounds(writer, refs, probe, rounds)
            refs.cleanup()
    finally:
        if probe is not None:
            probe.close()
        box.cleanup()
    variants = {}
    for name, by in wall.items():
        medians = {prog: statistics.median(v) for prog, v in body[name].items()}
        added = {prog: medians[prog] - medians["empty"] for prog in medians}
        empty_added = paired_median(by["empty programs"], by["no probe"])
        variants[name] = {
            "no_probe_ns": statistics.median(by["no probe"]),
            "empty_added_ns": empty_added,
            "podtap_over_empty_wall_ns": paired_median(by["podtap, unwatched"],
                                                       by["empty programs"]),
            "body_ns_over_empty": added,
            "body_over_empty_pct": 100 * added["podtap"] / empty_added if empty_added > 0
            else None,
        }
    return {"rounds": rounds, "calls": calls, "tracepoints": len(empty.tracepoints),
            "variants": variants, "samples": wall, "body_samples": body}


def report(r: dict[str, Any]) -> str:
    out = [f"podtap's cost for a writer it does not watch ({r['rounds']} rounds of "
           f"{r['calls']:,} calls of 100 B to /dev/null; medians)"]
    for name, v in r["variants"].items():
        pct = v["body_over_empty_pct"]
        out.append(f"  {name}: no probe {v['no_probe_ns']:.1f} ns; empty programs on the "
                   f"{r['tracepoints']} tracepoints add {v['empty_added_ns']:.1f} ns; podtap "
                   f"adds {v['podtap_over_empty_wall_ns']:+.1f} ns more (wall) / "
                   f"{v['body_ns_over_empty']['podtap']:+.1f} ns (body) = "
                   + (f"{pct:+.0f} %" if pct is not None else "n/a"))
        out.append(f"    body of the sys_exit_{name} program over an empty one (kernel stats): "
                   + ", ".join(f"{prog} {ns:+.1f} ns" for prog, ns in
                               v["body_ns_over_empty"].items() if prog != "empty"))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    r = unwatched_cost(args.rounds, args.calls)
    print(json.dumps(r) if args.json else report(r))


if __name__ == "__main__":
    main()
