"""The agent's own log: JSON lines, the text format, rate limiting, level names."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.logs import (
    LEVELS,
    RateLimitFilter,
    flush_suppressed,
    log_counters,
    parse_level,
    setup_logging,
)

RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def out(clock: Clock) -> io.StringIO:
    stream = io.StringIO()
    setup_logging("debug", "json", stream, window_s=10, clock=clock)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


log = logging.getLogger("podtap.test")


def test_one_json_object_per_line_with_the_fields(out: io.StringIO) -> None:
    before = time.time()
    log.info("sink %s sent %d", "es", 3, extra={"sink": "es", "records": 3})
    log.warning("two\nlines")
    after = time.time()
    first, second = lines(out)
    assert {k: first[k] for k in ("level", "logger", "msg", "sink", "records")} == {
        "level": "info", "logger": "podtap.test", "msg": "sink es sent 3",
        "sink": "es", "records": 3}
    assert "exc" not in first
    assert RFC3339_MS_UTC.fullmatch(first["time"])
    stamp = time.mktime(time.strptime(first["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert int(before) - 1 <= stamp <= after
    assert second["msg"] == "two\nlines"
    assert second["level"] == "warning"


def test_every_level_is_written_under_its_lower_case_name(out: io.StringIO) -> None:
    for name, number in LEVELS.items():
        logging.getLogger(f"podtap.{name}").log(number, "at %s", name)
    assert [(r["level"], r["msg"]) for r in lines(out)] == [(n, f"at {n}") for n in LEVELS]


def test_exception_traceback_in_exc(out: io.StringIO) -> None:
    try:
        raise KeyError("missing-key")
    except KeyError:
        log.exception("lookup failed")
    (record,) = lines(out)
    assert record["msg"] == "lookup failed"
    assert record["level"] == "error"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing-key'" in record["exc"]


def test_extras_that_json_cannot_hold_are_written_anyway(out: io.StringIO) -> None:
    log.info("odd", extra={"path": Path("/x"), "raw": b"\xff", "big": 2**70, "keys": {1: 2}})
    (record,) = lines(out)
    assert record["path"] == "PosixPath('/x')"
    assert record["big"] in (2**70, str(2**70), repr(2**70))
    assert record["raw"] == repr(b"\xff")


def test_extras_do_not_replace_the_core_fields(out: io.StringIO) -> None:
    log.info("core", extra={"time": 1, "level": "x", "logger": "y"})
    (record,) = lines(out)
    assert record["level"] == "info"
    assert record["logger"] == "podtap.test"
    assert RFC3339_MS_UTC.fullmatch(record["time"])
    assert (record["extra_time"], record["extra_level"], record["extra_logger"]) == (1, "x", "y")


def test_counters_are_a_json_object(out: io.StringIO) -> None:
    counters = {"kernel_records": 10, "lines": 9, "watch_delay_ms_avg": None}
    log_counters(log, "stopped", counters)
    (record,) = lines(out)
    assert record["msg"] == "stopped"
    assert record["counters"] == counters


def test_python_warnings_go_to_the_same_log(out: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("unverified TLS", UserWarning, stacklevel=1)
    (record,) = lines(out)
    assert record["logger"] == "py.warnings"
    assert "unverified TLS" in record["msg"]


def test_text_format_for_humans() -> None:
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    log_counters(log, "stopped", {"lines": 3})
    try:
        raise ValueError("bad")
    except ValueError:
        log.error("failed", extra={"sink": "es"}, exc_info=True)
    text = stream.getvalue().splitlines()
    assert re.fullmatch(
        RFC3339_MS_UTC.pattern + r' INFO podtap\.test: stopped counters=\{"lines":3\}', text[0]
    )
    assert text[1].endswith(" ERROR podtap.test: failed sink=es")
    assert text[2] == "Traceback (most recent call last):"
    assert text[-1] == "ValueError: bad"


def test_level_filters_below_it() -> None:
    stream = io.StringIO()
    setup_logging("WARNING", "json", stream)
    log.info("hidden")
    log.warning("shown")
    assert [r["msg"] for r in lines(stream)] == ["shown"]


def test_a_second_setup_replaces_the_first_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", first)
    setup_logging("info", "json", second)
    log.info("once")
    assert first.getvalue() == ""
    assert [r["msg"] for r in lines(second)] == ["once"]


@pytest.mark.parametrize("name", [*LEVELS, *(n.upper() for n in LEVELS), " Info "])
def test_level_names_in_any_case(name: str) -> None:
    assert parse_level(name) == LEVELS[name.strip().lower()]


@pytest.mark.parametrize("name", ["verbose", "", "warn", "trace", "10", "info,debug"])
def test_bad_level_names_say_which_are_valid(name: str) -> None:
    root = logging.getLogger()
    handlers = list(root.handlers)
    with pytest.raises(ValueError) as e:
        setup_logging(name, "json", io.StringIO())
    assert str(e.value) == (
        f"unknown log level {name!r}: expected one of debug, info, warning, error, critical"
    )
    assert root.handlers == handlers  # nothing installed


def test_bad_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml': expected one of json, text"):
        setup_logging("info", "xml", io.StringIO())


# -- rate limiting -------------------------------------------------------------------


def test_repeats_are_suppressed_then_counted_once_the_window_ends(
    out: io.StringIO, clock: Clock
) -> None:
    for i in range(5):
        log.error("sink es: connection refused (attempt %d)", i)
        clock.now += 1
    assert [r["msg"] for r in lines(out)] == ["sink es: connection refused (attempt 0)"]
    clock.now = 1010.0  # the window ends
    log.info("something else")
    records = lines(out)
    assert len(records) == 3
    summary = records[1]
    assert summary["suppressed"] == 4
    assert summary["msg"] == "sink es: connection refused (attempt 4)"  # the last one
    assert summary["level"] == "error"
    assert records[2]["msg"] == "something else"


def test_the_first_repeat_after_the_window_passes_after_its_summary(
    out: io.StringIO, clock: Clock
) -> None:
    log.warning("slow")
    log.warning("slow")
    clock.now += 10
    log.warning("slow")
    log.warning("slow")
    assert [(r["msg"], r.get("suppressed")) for r in lines(out)] == [
        ("slow", None), ("slow", 1), ("slow", None)]


def test_no_summary_when_nothing_was_suppressed(out: io.StringIO, clock: Clock) -> None:
    log.error("once")
    clock.now += 60
    log.error("other")
    flush_suppressed(final=True)
    assert [r.get("suppressed") for r in lines(out)] == [None, None]


def test_a_template_is_logger_level_and_msg(out: io.StringIO) -> None:
    log.error("failed %s", "a")
    log.error("failed %s", "b")  # same template: suppressed
    log.warning("failed %s", "c")  # other level
    logging.getLogger("podtap.other").error("failed %s", "d")  # other logger
    log.error("failed: %s", "e")  # other template
    assert [r["msg"] for r in lines(out)] == ["failed a", "failed c", "failed d", "failed: e"]


def test_info_and_debug_are_not_limited(out: io.StringIO) -> None:
    for _ in range(3):
        log.info("stats")
        log.debug("detail")
    assert len(lines(out)) == 6


def test_flush_writes_summaries_of_ended_windows_only(out: io.StringIO, clock: Clock) -> None:
    log.error("a")
    log.error("a")
    clock.now += 5
    log.error("b")
    log.error("b")
    log.error("b")
    clock.now += 5  # a's window has ended, b's has not
    flush_suppressed()
    assert [(r["msg"], r.get("suppressed")) for r in lines(out)] == [
        ("a", None), ("b", None), ("a", 1)]
    flush_suppressed(final=True)  # at exit: every pending count
    assert lines(out)[-1] == {**lines(out)[-1], "msg": "b", "suppressed": 2}


def test_summary_leaves_the_traceback_out(out: io.StringIO, clock: Clock) -> None:
    for _ in range(3):
        try:
            raise OSError("disk full")
        except OSError:
            log.exception("spill failed")
    clock.now += 10
    flush_suppressed()
    first, summary = lines(out)
    assert "disk full" in first["exc"]
    assert summary["suppressed"] == 2
    assert "exc" not in summary


def test_counts_are_exact_across_threads(clock: Clock) -> None:
    emitted: list[logging.LogRecord] = []
    limiter = RateLimitFilter(emitted.append, window_s=10, clock=clock)
    passed = []

    def hammer() -> None:
        record = logging.makeLogRecord({"name": "t", "levelno": logging.ERROR, "msg": "x"})
        passed.extend(1 for _ in range(2000) if limiter.filter(record))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    limiter.flush(final=True)
    assert len(passed) == 1
    assert [r.suppressed for r in emitted] == [7999]  # type: ignore[attr-defined]
