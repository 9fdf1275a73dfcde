"""Tests of agent.sinks.retry: status classes, backoff with full jitter, Retry-After."""

from __future__ import annotations

import calendar
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import RetryConfig
from agent.sinks.retry import (
    backoff_s,
    classify_status,
    parse_http_date,
    parse_retry_after,
    retry_delay_s,
    status_class,
)

CFG = RetryConfig(initial_backoff_s=0.5, max_backoff_s=30.0, max_retry_after_s=300.0)
NOW = float(calendar.timegm((2026, 12, 1, 20, 0, 0)))


def test_classify_every_status() -> None:
    for status in range(100, 600):
        verdict = classify_status(status)
        if 200 <= status <= 299:
            assert verdict == "ok", status
        elif status in (408, 429) or status >= 500:
            assert verdict == "retry", status
        else:
            assert verdict == "dead", status  # other 4xx, and 1xx/3xx: never retried forever


def test_status_class() -> None:
    assert [status_class(s) for s in (200, 204, 299)] == [None] * 3
    assert status_class(429) == "429"
    assert [status_class(s) for s in (400, 408, 413, 499)] == ["4xx"] * 4
    assert [status_class(s) for s in (500, 503, 599)] == ["5xx"] * 3
    assert [status_class(s) for s in (101, 302)] == ["other"] * 2


def test_backoff_doubles_up_to_the_maximum_with_full_jitter() -> None:
    ceilings = [backoff_s(n, CFG, lambda: 1.0) for n in range(1, 10)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_s(3, CFG, lambda: 0.0) == 0.0
    assert backoff_s(3, CFG, lambda: 0.25) == 0.5
    assert backoff_s(0, CFG, lambda: 1.0) == 0.5  # no attempt yet counts as the first
    assert backoff_s(10**9, CFG, lambda: 1.0) == 30.0  # no overflow


@given(attempt=st.integers(0, 10**6), r=st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_stays_in_bounds(attempt: int, r: float) -> None:
    delay = backoff_s(attempt, CFG, lambda: r)
    assert 0.0 <= delay < CFG.max_backoff_s or delay == 0.0


def test_retry_delay_prefers_retry_after_within_the_cap() -> None:
    assert retry_delay_s(1, 12.0, CFG, lambda: 1.0) == 12.0
    assert retry_delay_s(1, 3600.0, CFG, lambda: 1.0) == 300.0
    assert retry_delay_s(1, -4.0, CFG, lambda: 1.0) == 0.0
    assert retry_delay_s(4, None, CFG, lambda: 1.0) == 4.0
    capped = RetryConfig(initial_backoff_s=0.5, max_backoff_s=1.0, max_retry_after_s=0.0)
    assert retry_delay_s(1, 60.0, capped, lambda: 1.0) == 0.0


def test_retry_after_delay_seconds() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after("0", NOW) == 0.0
    assert parse_retry_after(" 7 ", NOW) == 7.0  # optional whitespace around a field value
    assert parse_retry_after("0009", NOW) == 9.0
    assert parse_retry_after(None, NOW) is None


@pytest.mark.parametrize("value", [
    "", " ", "-5", "+5", "1.5", "1e3", "5s", "abc", "120, 60", "0x10", "١٢",  # arabic digits
    "Tue, 01 Dec 2026 20:00:60 UTC", "Tue, 1 Dec 2026 20:00:00 GMT",
    "Tue, 31 Feb 2026 20:00:00 GMT", "Tue, 01 Dec 2026 24:00:00 GMT",
    "tue, 01 dec 2026 20:00:00 gmt", "Tue, 01 Dec 0000 20:00:00 GMT",
    "2026-12-01T20:00:00Z", "Tuesday, 01-Dec-26 20:00:00", "Tue Dec  1 20:00:00",
])
def test_malformed_retry_after_is_ignored(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_retry_after_http_dates_in_all_three_forms() -> None:
    future = NOW + 90
    t = time.gmtime(future)
    imf = time.strftime("%a, %d %b %Y %H:%M:%S GMT", t)
    assert imf == "Tue, 01 Dec 2026 20:01:30 GMT"
    assert parse_retry_after(imf, NOW) == 90.0
    assert parse_retry_after("Tuesday, 01-Dec-26 20:01:30 GMT", NOW) == 90.0  # RFC 850
    assert parse_retry_after("Tue Dec  1 20:01:30 2026", NOW) == 90.0  # asctime
    assert parse_retry_after("Tue, 01 Dec 2026 19:00:00 GMT", NOW) == 0.0  # past: now
    # RFC 850's two-digit year: more than 50 years ahead means the past century
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", NOW) == 784111777.0
    assert parse_http_date("Monday, 06-Nov-69 08:49:37 GMT", NOW) == float(
        calendar.timegm((2069, 11, 6, 8, 49, 37)))
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT", NOW) == 784111777.0
    assert parse_http_date("Sun Nov  6 08:49:37 1994", NOW) == 784111777.0
    assert parse_http_date("Sun Nov 16 08:49:37 1994", NOW) == 784111777.0 + 10 * 86400


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9999, 12, 31)))
def test_every_imf_fixdate_parses_back(when: datetime) -> None:
    when = when.replace(microsecond=0, tzinfo=UTC)
    text = when.strftime("%a, %d %b %Y %H:%M:%S GMT")  # C locale names
    assert parse_http_date(text, NOW) == when.timestamp()
    assert parse_retry_after(text, when.timestamp() - 5) == 5.0
    assert parse_retry_after(text, (when + timedelta(seconds=5)).timestamp()) == 0.0


@given(st.text(max_size=40))
def test_any_header_text_never_raises(value: str) -> None:
    delay = parse_retry_after(value, NOW)
    assert delay is None or delay >= 0.0
