"""Retry policy of every sink: which answers are retried, and how long to wait.

Pure functions (the random source is passed in), shared by the codecs (`classify_status`)
and the delivery runner (`retry_delay_s`).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable
from typing import Literal

from agent.config import RetryConfig

Verdict = Literal["ok", "retry", "dead"]


def classify_status(status: int) -> Verdict:
    """2xx: accepted. 408, 429 and 5xx: try again later. Anything else (other 4xx, and
    1xx/3xx, which a sink never expects): the request will never be accepted as it is."""
    if 200 <= status <= 299:
        return "ok"
    if status in (408, 429) or 500 <= status <= 599:
        return "retry"
    return "dead"


def status_class(status: int) -> str | None:
    """The key of `SinkStats.failures` for an HTTP answer; None for 2xx."""
    if 200 <= status <= 299:
        return None
    if status == 429:
        return "429"
    if 400 <= status <= 499:
        return "4xx"
    if 500 <= status <= 599:
        return "5xx"
    return "other"


def backoff_s(attempt: int, cfg: RetryConfig, random: Callable[[], float]) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2^(attempt-1))].

    `attempt` is the number of attempts made so far (>= 1); `random()` is in [0, 1).
    """
    exponent = min(max(attempt - 1, 0), 62)  # 2**62 * any initial_backoff_s > max_backoff_s
    ceiling = min(cfg.max_backoff_s, cfg.initial_backoff_s * float(1 << exponent))
    return ceiling * random()


def retry_delay_s(
    attempt: int, retry_after_s: float | None, cfg: RetryConfig, random: Callable[[], float]
) -> float:
    """How long to wait before the next attempt: the server's Retry-After when it gave one
    (at most `max_retry_after_s`), else the jittered backoff."""
    if retry_after_s is not None:
        return min(max(retry_after_s, 0.0), cfg.max_retry_after_s)
    return backoff_s(attempt, cfg, random)


# RFC 9110 section 10.2.3: Retry-After = HTTP-date / delay-seconds. delay-seconds is
# 1*DIGIT; an HTTP-date is an IMF-fixdate, and recipients must also accept the obsolete
# RFC 850 and asctime forms (section 5.6.7).
_DELAY = re.compile(r"[0-9]+")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MON = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(rf"{_DAY}, ([0-9]{{2}}) {_MON} ([0-9]{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"{_LONG_DAY}, ([0-9]{{2}})-{_MON}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME = re.compile(rf"{_DAY} {_MON} ([ 0-9][0-9]) {_TIME} ([0-9]{{4}})")


def parse_http_date(value: str, now_s: float) -> float | None:
    """Seconds since the epoch of an HTTP-date in any of its three forms; None if malformed.

    A two-digit RFC 850 year more than 50 years in the future is in the past century
    (RFC 9110 section 5.6.7); `now_s` decides which century that is.
    """
    value = value.strip()
    if m := _IMF_FIXDATE.fullmatch(value):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(value):
        day, mon, yy, hh, mm, ss = m.groups()
        this_year = _year_of(now_s)
        century_year = this_year - this_year % 100 + int(yy)
        year = str(century_year - 100 if century_year > this_year + 50 else century_year)
    elif m := _ASCTIME.fullmatch(value):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    fields = (int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss))
    if not _valid_date(*fields):
        return None
    return float(calendar.timegm((*fields, 0, 0, 0)))


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After header value (`now_s`: seconds since the epoch,
    for an HTTP-date). A date in the past means 0; None when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY.fullmatch(value):
        return float(int(value))
    when = parse_http_date(value, now_s)
    if when is None:
        return None
    return max(0.0, when - now_s)


def _year_of(epoch_s: float) -> int:
    return time.gmtime(epoch_s).tm_year


def _valid_date(year: int, month: int, day: int, hh: int, mm: int, ss: int) -> bool:
    if year < 1 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        return False
    return hh <= 23 and mm <= 59 and ss <= 60  # 60: a leap second
