"""The benchmark page builder (bench/page.py) on canned figures: tables, verdicts, plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench import page

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def peer_row(shipper: str, rate: int, sustained: bool = True, cores: float = 0.1,
             rss: float = 20.0) -> dict[str, Any]:
    return {"shipper": shipper, "rate": rate, "sustained": sustained, "shipper_cores": cores,
            "writer_extra_cores": 0.01, "total_cores": cores + 0.01, "rss_max_mib": rss,
            "drain_lag_s": 1.0, "expected": 1000, "received": 1000 if sustained else 990,
            "lost": 0 if sustained else 10, "duplicates": 0, "p50_s": 0.2, "p99_s": 0.7,
            "max_s": 1.0}


def ramp_row(sink: str, gzip: str, rate: int, held: bool, cores: float) -> dict[str, Any]:
    return {"sink": sink, "gzip": gzip, "lines/s": rate, "held": held, "agent cores": cores,
            "RSS w/o ring max MiB": 50.0, "acked after the writers s": 1.0,
            "missing": 0 if held else 5, "machine busy %": 60,
            "counted losses": "none" if held else "sink_dropped 5"}


CANNED: dict[str, Any] = {
    "machine": {"date": "2026-12-01 20:00 UTC", "cpu": "Test CPU", "cpus": 2, "memory_gib": 24,
                "kernel": "6.18.0 (#1)", "os": "Debian 12.11", "python": "3.11.2",
                "podtap": "abc1234", "load_before": 0.5, "wakeup_us": 21.5},
    "wakeup_us_after": 80.25,
    "smoke": False,
    "duration_s": 1800,
    "cases": {
        "write_cost": {
            "ns": {
                "write 100 B": {"no probe": 800.0, "empty programs": 900.0,
                                "podtap, unwatched": 905.0, "podtap, watched": 1300.0},
                "write 65536 B": {"no probe": 20000.0, "empty programs": 20100.0,
                                  "podtap, unwatched": 20150.0, "podtap, watched": 40000.0},
            },
            "samples": {"write 100 B": {"no probe": [790.0, 800.0, 812.0]}},
            "runs": 3, "calls": {"100": 300000, "65536": 20000},
            "empty_tracepoints": ["syscalls:sys_exit_write"] * 14,
            "watched_tap_counters": "podtap: records=1 dropped_records=0",
            "unwatched": {
                "rounds": 15, "calls": 200000, "tracepoints": 15,
                "variants": {
                    "write": {"no_probe_ns": 93.0, "empty_added_ns": 160.0,
                              "podtap_over_empty_wall_ns": 6.0, "body_over_empty_pct": 5.0,
                              "body_ns_over_empty": {"empty": 0.0, "cgroup_id_only": 3.9,
                                                     "cgroup_filter": 7.4, "podtap": 8.0}},
                    "writev": {"no_probe_ns": 134.0, "empty_added_ns": 16.0,
                               "podtap_over_empty_wall_ns": 7.0, "body_over_empty_pct": 50.0,
                               "body_ns_over_empty": {"empty": 0.0, "cgroup_id_only": 4.0,
                                                      "cgroup_filter": 7.2, "podtap": 8.0}},
                },
            },
        },
        "standard_point": {
            "containers": 10, "rate_per_container": 1000, "seconds": 300.0,
            "sink": "loki (loopback)", "cpu_cores": 0.0421, "rss_avg_mib": 60.0,
            "rss_max_mib": 64.0, "rss_without_ring_avg_mib": 44.0,
            "rss_without_ring_max_mib": 46.5, "expected": 3_000_000, "received": 3_000_000,
            "lost": 0, "duplicates": 0, "p50_s": 0.31, "p99_s": 1.234, "max_s": 1.9,
            "kernel_drop_records": 0,
            "latency_quantiles_s": [i / 100 for i in range(101)],
            "rss_series_mib": [60.0, 61.0, 64.0], "sample_period_s": 1.0,
        },
        "peers": {
            "seconds": 20.0, "writers": 2, "line_bytes": 100, "sink": "ES _bulk (loopback)",
            "rows": [peer_row("rsyslog", 10_000, cores=0.33, rss=13.0),
                     peer_row("rsyslog", 20_000, sustained=False),
                     peer_row("podtap", 10_000, cores=0.077, rss=63.4),
                     peer_row("podtap", 20_000),
                     peer_row("podtap", 40_000)],
        },
        "agent_throughput": {"text": "ramp output", "data": {"writers": 2, "seconds": 60,
                                                             "rows": [
            ramp_row("stdout", "n/a", 200_000, True, 0.5),
            ramp_row("stdout", "n/a", 300_000, True, 0.7),
            ramp_row("loki", "on", 150_000, True, 0.45),
            ramp_row("loki", "on", 200_000, False, 0.6),
            ramp_row("elasticsearch", "off", 250_000, True, 1.2)]}},
        "profile": {"text": "profile output", "data": {"rows": [
            {**ramp_row("loki", "on", 10_000, True, 0.06),
             "profile": {"threads": {"MainThread": 0.04, "podtap-ring-drain": 0.01,
                                     "asyncio_0": 0.008},
                         "gil_cores": 0.05, "samples": 187,
                         "stages": {"encode records": 0.4, "gzip": 0.1, "other": 0.5}}},
            {**ramp_row("loki", "on", 200_000, False, 0.9),
             "profile": {"threads": {"MainThread": 0.7, "podtap-ring-drain": 0.1,
                                     "asyncio_0": 0.15, "asyncio_1": 0.02},
                         "gil_cores": 0.8, "samples": 3000,
                         "stages": {"encode records": 0.5, "decode": 0.25, "other": 0.25}}}]}},
        "containerd": {"error": "TimeoutError: the shim did not start\nmore"},
        "scale": {"sizes": [
            {"containers": 0, "kubelet_sync_s": 0.01, "agent_start_s": 1.1, "idle_cores": 0.002,
             "rss_mib": 58.0, "rss_without_ring_mib": 42.0, "kubelet_polls": 4,
             "pods_start_s": 0.0},
            {"containers": 1000, "kubelet_sync_s": 0.456, "agent_start_s": 2.0,
             "idle_cores": 0.0123, "rss_mib": 70.0, "rss_without_ring_mib": 54.0,
             "kubelet_polls": 4, "pods_start_s": 30.0}],
            "poll_interval_s": 10.0, "idle_seconds": 30.0},
        "micro": {"outputs": {"bench/decode_bench.py": "decode, 100-byte records: 1,000 rec/s\n"}},
    },
}


def page_text(results: dict[str, Any], tmp_path: Path) -> str:
    """The page rendered from `results` into tmp_path (plots beside it)."""
    out = tmp_path / "benchmarks.md"
    page.write_page(results, out)
    return out.read_text()


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[str, Path]:
    return page_text(copy.deepcopy(CANNED), tmp_path), tmp_path / "bench"


def goal_row(text: str, what: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {what}"))


def test_the_page_names_machine_kernel_and_date(rendered: tuple[str, Path]) -> None:
    text, _ = rendered
    assert "| thread wake-up round trip through a pipe, at the start / end of the run | " \
        "21.5 µs / 80.2 µs |" in text
    for fact in ("Test CPU, 2 CPUs", "6.18.0 (#1)", "2026-12-01 20:00 UTC", "abc1234",
                 "full run"):
        assert fact in text


def test_every_measured_case_has_its_figures_in_a_table(rendered: tuple[str, Path]) -> None:
    text, _ = rendered
    assert "| write 100 B | 800 (790–812) | 900 (+100) | 905 (+105) | 1,300 (+500) |" \
        in text
    assert "| lines lost | 0 of 3,000,000 | 0 |" in text
    assert "0.310 / 1.234 / 1.900 s" in text
    assert "| 1,000 | 0.456 | 0.0123 | 70.0 | 54.0 | 2.0 |" in text
    assert "decode, 100-byte records: 1,000 rec/s" in text
    assert "Fluent Bit" in text and "not measured here" in text


def test_peers_table_gives_the_highest_sustained_rate_and_cost_at_the_first_rate(
    rendered: tuple[str, Path],
) -> None:
    text, _ = rendered
    rsyslog = goal_row(text, "rsyslog | 10,000 lines/s")
    assert "0.340" in rsyslog and "13.0" in rsyslog and "highest rate tried" not in rsyslog
    podtap = goal_row(text, "podtap | 40,000 lines/s (the highest rate tried)")
    assert "0.087" in podtap
    assert "| rsyslog | 20,000 | **no** | 10 |" in text


def test_missing_and_failed_cases_are_shown_as_not_measured(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    results["cases"]["agent_throughput"] = {"not_measured": "bench/agent_throughput.py is gone"}
    text = page_text(results, tmp_path)
    assert "not measured: bench/agent_throughput.py is gone" in text
    assert "not measured: the case failed: `TimeoutError: the shim did not start`" in text


def test_goal_verdicts_follow_the_thresholds(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    text = page_text(results, tmp_path)
    assert goal_row(text, "RSS without").endswith("| meets |")  # 46.5 <= 48
    assert goal_row(text, "CPU at 10K").endswith("| meets |")  # 0.0421 <= 0.05
    stdout = goal_row(text, "zero-loss rate, 2 writers, stdout")
    assert stdout.endswith("| meets |") and "300,000 lines/s on 0.70 core" in stdout
    assert "(the highest rate tried)" in stdout
    loki = goal_row(text, "zero-loss rate, 2 writers, loki (loopback), gzip on")
    assert loki.endswith("| **misses** |") and "150,000 lines/s" in loki  # 200K not held
    # held, but on more than 1 core: does not count
    es = goal_row(text, "zero-loss rate, 2 writers, elasticsearch (loopback), gzip off")
    assert es.endswith("| **misses** |") and "none held" in es
    assert goal_row(text, "write() cost").endswith("| **misses** |")  # +5 %, +50 %: worst
    results["cases"]["standard_point"]["rss_without_ring_max_mib"] = 48.5
    results["cases"]["standard_point"]["p99_s"] = 1.6
    del results["cases"]["agent_throughput"]
    text = page_text(results, tmp_path)
    assert goal_row(text, "RSS without").endswith("| **misses** |")
    assert goal_row(text, "latency").endswith("| **misses** |")
    assert goal_row(text, "zero-loss rate").endswith("| not measured |")


def test_the_worst_write_cost_variant_decides(rendered: tuple[str, Path]) -> None:
    text, _ = rendered
    # writev: an 8 ns body over 16 ns of empty programs = +50 %: the worst variant
    assert "+50 %" in goal_row(text, "write() cost")
    assert "| meets |" not in goal_row(text, "write() cost")


def test_the_precise_unwatched_cost_has_its_table(rendered: tuple[str, Path]) -> None:
    text, _ = rendered
    assert "| writev 100 B | 134.0 | +16.0 | +7.0 | +8.0 | +50 % |" in text
    assert "| `sys_exit_writev` | +4.0 | +7.2 | +8.0 | +45 % |" in text


def test_the_floor_is_called_out_only_when_it_alone_misses_the_goal(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    assert "cannot have" not in page_text(results, tmp_path)  # write: 7.4 of 160 ns < 10 %
    results["cases"]["write_cost"]["unwatched"]["variants"]["write"]["empty_added_ns"] = 40.0
    assert "the minimal filter alone is more than 10 %" in page_text(results, tmp_path)


def test_a_write_cost_without_the_precise_figures_is_not_measured(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    del results["cases"]["write_cost"]["unwatched"]
    assert goal_row(page_text(results, tmp_path), "write() cost").endswith("| not measured |")


def test_plots_are_png_files_linked_from_the_page(rendered: tuple[str, Path]) -> None:
    text, plots = rendered
    for name in ("write_cost", "standard_point", "throughput", "peers", "scale"):
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](bench/{name}.png)" in text
    assert not (plots / "containerd.png").exists()


def test_last_json_takes_the_last_json_line_of_a_scripts_output() -> None:
    text = 'progress\n{"rows": [1]}\nnot json {\n{"rows": [2]}\ndone\n'
    assert page.last_json(text) == {"rows": [2]}
    assert page.last_json("only text\n") is None
    assert page.last_json("[1, 2]") == [1, 2]


def test_throughput_rows_from_json_become_a_table(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    rows = [ramp_row("loki", "on", 100_000, True, 0.412)]
    results["cases"]["agent_throughput"] = {"data": {"rows": rows},
                                            "text": "raw output\n" + json.dumps({"rows": rows})}
    text = page_text(results, tmp_path)
    assert "| sink | gzip | lines/s | held | agent cores |" in text
    assert "| loki | on | 100,000 | True | 0.412 |" in text
    assert "raw output" in text


def test_broken_lists_the_cases_that_failed() -> None:
    assert page.broken(CANNED) == ["containerd"]


def test_the_wakeup_round_trip_is_a_positive_time() -> None:
    us = page.wakeup_round_trip_us(trips=200, runs=3)
    assert 0 < us < 1e6


def test_smoke_mode_picks_the_short_figures() -> None:
    assert page.Mode(smoke=True).pick(300, 15) == 15
    assert page.Mode(smoke=False).pick(300, 15) == 300


def test_losses_text_names_only_the_counters_that_grew() -> None:
    assert page.losses_text({}) == "none"
    assert page.losses_text(None) == "n/a"
    assert page.losses_text({"podtap_ringbuf_dropped_records_total": 2125.0}) == \
        "ringbuf_dropped_records 2,125"


def test_a_failed_component_script_is_named_and_the_others_still_shown(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    results["cases"]["micro"]["error"] = "bench/disk_buffer_bench.py exited 1: AttributeError"
    text = page_text(results, tmp_path)
    assert "**Failed in this run:**" in text and "disk_buffer_bench.py exited 1" in text
    assert "decode, 100-byte records: 1,000 rec/s" in text
    assert page.broken(results) == ["containerd", "micro"]


def test_losses_text_names_the_lines_captured_apart() -> None:
    assert page.losses_text({"podtap_lines_total": 1_200_000.0}) == \
        "none (lines captured 1,200,000)"


def test_losses_text_reads_labelled_sink_counters() -> None:
    counted = {'podtap_sink_retries_total{sink="es"}': 3.0,
               'podtap_sink_sent_records_total{sink="es"}': 900.0, "podtap_lines_total": 1000.0}
    assert page.losses_text(counted) == \
        'sink_retries{sink="es"} 3 (lines captured 1,000, acknowledged 900)'


def test_the_profile_gives_each_threads_cpu_and_each_stages_share_and_cores(
    rendered: tuple[str, Path]
) -> None:
    text, _ = rendered
    section = text.split("## Where the agent's CPU goes", 1)[1].split("\n## ", 1)[0]
    assert "| 10,000 | 0.060 | 0.040 | 0.010 | 0.008 | n/a | 0.050 |" in section
    assert "| 200,000 | 0.900 | 0.700 | 0.100 | 0.150 | 0.020 | 0.800 |" in section
    assert "| encode records | 40 % (0.020) | 50 % (0.400) |" in section
    assert "| gzip | 10 % (0.005) | 0 % (0.000) |" in section
    assert "| decode | 0 % (0.000) | 25 % (0.200) |" in section
    assert "At 10,000 lines/s, 40 % of the Python work is per line" in section
    assert "At 200,000 lines/s, 75 % of the Python work is per line" in section


def test_a_failed_profile_is_not_measured(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    results["cases"]["profile"] = {"error": "RuntimeError: no profile: ['py-spy not found']"}
    assert "profile (bench/agent_throughput.py --profile): not measured: the case failed" in (
        page_text(results, tmp_path))


def test_a_cpu_goal_missed_on_fixed_work_says_what_would_cut_it(tmp_path: Path) -> None:
    results = copy.deepcopy(CANNED)
    results["cases"]["standard_point"]["cpu_cores"] = 0.08  # misses 0.05
    goals = page_text(results, tmp_path).split("## write() cost", 1)[0]
    assert "[the profile](#where-the-agents-cpu-goes)" in goals
    assert "fixed work per batch" in goals  # 40 % per line at 10K in the canned profile
    prof = results["cases"]["profile"]["data"]["rows"][0]["profile"]
    prof["stages"] = {"decode": 0.6, "other": 0.4}
    assert "fixed work per batch" not in page_text(results, tmp_path)
