"""The agent's own log: one JSON object per line on stderr (or text for humans),
with repeated warnings and errors rate-limited.

JSON fields: `time` (RFC 3339, UTC, milliseconds), `level`, `logger`, `msg`, every
`extra={...}` field as a top-level key, `exc` (the traceback) when there is one.

    log.warning("sink %s: %s", name, err, extra={"sink": name, "status": 503})
    {"time":"2026-12-01T20:37:41.123Z","level":"warning","logger":"podtap.sinks",
     "msg":"sink es: ...","sink":"es","status":503}

Rate limiting: the first record of a message template (the unformatted `msg`, with
the logger and level) goes through; repeats within `window_s` are counted, not
written; once the window has ended one line repeats the last of them with
`"suppressed": <count>`. The summary is written by the next record logged after the
window (any logger), or by `flush_suppressed()`, which housekeeping calls periodically.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
FORMATS = ("json", "text")
DEFAULT_WINDOW_S = 10.0

# Attributes every LogRecord has: anything else on a record came from `extra`.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_CORE_KEYS = ("time", "level", "logger", "msg", "exc", "stack")


def parse_level(name: str) -> int:
    """A level name (any case) -> its number; ValueError naming the valid ones."""
    level = LEVELS.get(name.strip().lower()) if isinstance(name, str) else None
    if level is None:
        raise ValueError(f"unknown log level {name!r}: expected one of {', '.join(LEVELS)}")
    return level


def rfc3339_utc(created: float) -> str:
    secs = int(created)
    millis = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _RECORD_ATTRS and not k.startswith("_")}


def dumps(obj: Any) -> str:
    """JSON that never raises: orjson, else the standard library with repr for the rest
    (ints beyond 64 bits, keys that are not strings)."""
    try:
        return orjson.dumps(obj, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(obj, default=repr)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": rfc3339_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            out[f"extra_{key}" if key in _CORE_KEYS else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return dumps(out)


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <msg> key=value ...`, then the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        head = (f"{rfc3339_utc(record.created)} {record.levelname} {record.name}: "
                f"{record.getMessage()}")
        fields = "".join(f" {k}={text_value(v)}" for k, v in record_extras(record).items())
        text = head + fields
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def text_value(value: Any) -> str:
    if isinstance(value, str) and value and " " not in value and '"' not in value:
        return value
    return dumps(value)


@dataclass(slots=True)
class _Window:
    until: float
    suppressed: int = 0
    last: logging.LogRecord | None = None


class RateLimitFilter(logging.Filter):
    """Lets the first record of a (logger, level, msg template) through per window;
    counts the rest and hands one summary record per window to `emit`."""

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        window_s: float = DEFAULT_WINDOW_S,
        min_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.emit = emit
        self.window_s = window_s
        self.min_level = min_level
        self.clock = clock
        # Insertion order is expiry order: every window lasts window_s.
        self._windows: dict[tuple[str, int, object], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.msg)
        limited = record.levelno >= self.min_level and "suppressed" not in vars(record)
        if limited:
            try:
                hash(key)
            except TypeError:  # a msg that is not a template (a dict, say): never limited
                limited = False
        window = None
        with self._lock:
            now = self.clock()
            ended = self._take_ended(now)  # any record closes the windows that ended
            if limited:
                window = self._windows.get(key)
                if window is None:
                    self._windows[key] = _Window(now + self.window_s)
                else:
                    window.suppressed += 1
                    window.last = record
        self._emit_summaries(ended)
        return window is None

    def flush(self, final: bool = False) -> None:
        """Write the summaries of windows that ended (of every window when `final`)."""
        with self._lock:
            ended = self._take_ended(float("inf") if final else self.clock())
        self._emit_summaries(ended)

    def _take_ended(self, now: float) -> list[_Window]:
        ended = []
        windows = self._windows
        while windows:
            key = next(iter(windows))
            if windows[key].until > now:
                break
            ended.append(windows.pop(key))
        return [w for w in ended if w.suppressed]

    def _emit_summaries(self, windows: list[_Window]) -> None:
        for window in windows:
            assert window.last is not None
            self.emit(summary_record(window.last, window.suppressed))


def summary_record(last: logging.LogRecord, suppressed: int) -> logging.LogRecord:
    """The last suppressed record, now, without its traceback, with the count."""
    record = logging.makeLogRecord(vars(last))
    record.created = time.time()
    record.msecs = (record.created - int(record.created)) * 1000
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None
    record.suppressed = suppressed
    return record


class _AgentHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(
    level: str,
    fmt: str = "json",
    stream: TextIO | None = None,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    clock: Callable[[], float] = time.monotonic,
) -> RateLimitFilter:
    """Configure the root logger: one handler on `stream` (stderr) in `fmt`, rate-limited.

    Raises ValueError for an unknown level or format. Calling it again (once the
    configuration file has named the format) replaces the handler it installed.
    Returns the rate limiter, whose `flush()` housekeeping calls periodically.
    """
    numeric = parse_level(level)
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _AgentHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _AgentHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    limiter = RateLimitFilter(handler.handle, window_s=window_s, clock=clock)
    handler.addFilter(limiter)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)  # warnings (urllib3's, say) in the same format
    return limiter


def flush_suppressed(final: bool = False) -> None:
    """Write the pending `suppressed` summaries of the handler setup_logging installed."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _AgentHandler):
            for f in handler.filters:
                if isinstance(f, RateLimitFilter):
                    f.flush(final)


def log_counters(
    logger: logging.Logger, msg: str, counters: Mapping[str, object], level: int = logging.INFO
) -> None:
    """Counters as a JSON object under `counters` (not Python dict text in `msg`)."""
    logger.log(level, msg, extra={"counters": dict(counters)})
