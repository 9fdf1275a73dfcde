"""A loopback Loki: `POST /loki/api/v1/push` as Loki 3.x answers it, and `GET /ready`.

Written from Loki's documentation and its push path (distributor, validator, ingester
stream), so that what real Loki refuses, this server refuses, with Loki's texts:

- body: JSON (`Content-Type: application/json`), plain, gzip or deflate
  (`Content-Encoding`; any other encoding: 400 `Content-Encoding "x" not supported`).
  A missing Content-Type is a 400 (Loki's mime parse fails). Protobuf + snappy (any other
  Content-Type) is answered 415: not implemented here (real Loki would decode it).
- JSON: `{"streams":[{"stream":{labels},"values":[["<ns>","<line>",{metadata}?],...]}]}`;
  timestamps must be strings holding a base-10 int64, lines strings, structured metadata
  an object of strings, at most three elements per value. Anything else: 400.
- labels: names `[a-zA-Z_][a-zA-Z0-9_]*` (else 400 `Error parsing labels ...`), empty
  values dropped (as Loki's ParseLabels does), at least one label left, at most
  `max_label_names` names (15 by default), names <= 1024 and values <= 2048 bytes.
- entries: older than `reject_old_samples_max_age_s` or newer than now +
  `creation_grace_period_s`, lines longer than `max_line_size`, structured metadata when
  not allowed or too large: refused one by one.
- per stream (the ingester): with `unordered_writes` (Loki's default) an entry older than
  the stream's newest minus `max_chunk_age_s / 2` is refused ("entry too far behind");
  without it, any entry older than the newest ("entry out of order"). An entry equal to
  a stored one (same time, same line) is dropped silently, as Loki deduplicates.
- the valid entries of a push are stored even when others are refused; the answer is
  then 400 with the (last) refusal's text. Success is 204.
- `multi_tenant` (Loki's `auth_enabled`): `X-Scope-OrgID` is required (401 `no org id`);
  otherwise the header is ignored and everything goes to tenant "fake", as in Loki.
- a token bucket (`rate_limit(bytes_per_s, burst)`) answers 429 with Loki's text when a
  push's valid line bytes do not fit; nothing of that push is stored.

Test knobs (thread-safe, from any thread): `fail_next(n, status, retry_after)`,
`delay_s` (every answer that much later), `down()` / `up()` (close the listener, listen
again on the same port), `requests` (what was asked and answered).

`LoopbackBackend` is the part shared with the loopback OTLP receiver (simnode/otlp.py).
"""

from __future__ import annotations

import asyncio
import gzip
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from simnode.loopback import LoopbackHttpsServer, bearer_matches


@dataclass(frozen=True)
class RequestLog:
    """One request as the server saw it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body_bytes: int  # as received (compressed when it was)
    status: int
    answer: str
    time: float = 0.0  # time.monotonic() when the request arrived


class BadRequest(Exception):
    """The request is refused as a whole: (status, text)."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}


class LoopbackBackend(LoopbackHttpsServer):
    """A log backend on 127.0.0.1 (HTTP, or HTTPS with `tls=True`) with failure knobs.

    A subclass answers through `_route(request, body)`, `body` being the raw request body.
    """

    def __init__(self, *, tls: bool = False, token: str | None = None) -> None:
        super().__init__(token=token, tls=None)
        self._use_tls = tls
        self._one_shot: deque[tuple[int, str | None, str]] = deque()
        self._delay_s = 0.0
        self._down = False
        self.requests: list[RequestLog] = []

    # -- knobs

    def fail_next(self, count: int, status: int = 429, retry_after: str | None = "1",
                  body: str = "") -> None:
        """Answer the next `count` requests with `status` (and Retry-After when given)."""
        with self._lock:
            self._one_shot.extend([(status, retry_after, body)] * count)

    @property
    def delay_s(self) -> float:
        with self._lock:
            return self._delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        with self._lock:
            self._delay_s = value

    def down(self) -> None:
        """Close the listener and the open connections (clients get connection errors)."""
        with self._lock:
            if self._down:
                return
            self._down = True
        self._call(self._close_listener())

    def up(self) -> None:
        """Listen again, on the same port."""
        with self._lock:
            if not self._down:
                return
            self._down = False
        self._call(self._listen())

    @property
    def url(self) -> str:
        scheme = "https" if self._use_tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- serving

    async def _route(self, request: web.Request, body: bytes) -> web.Response:
        raise NotImplementedError

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.read()
        with self._lock:
            fault = self._one_shot.popleft() if self._one_shot else None
            delay = self._delay_s
            token = self._token
        if delay > 0:
            await asyncio.sleep(delay)
        if not bearer_matches(request.headers.get("Authorization"), token):
            response = web.Response(status=401, text="unauthorized\n")
        elif fault is not None:
            status, retry_after, text = fault
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            response = web.Response(status=status, text=text or f"injected {status}\n",
                                    headers=headers)
        else:
            try:
                response = await self._route(request, body)
            except BadRequest as e:
                response = web.Response(status=e.status, text=e.text, headers=e.headers)
        self._log(request, body, response, arrived)
        return response

    def _log(self, request: web.Request, body: bytes, response: web.Response,
             arrived: float) -> None:
        answer = response.body if isinstance(response.body, bytes) else b""
        entry = RequestLog(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body_bytes=len(body),
            status=response.status,
            answer=answer.decode("utf-8", "replace"),
            time=arrived,
        )
        with self._lock:
            self.requests.append(entry)

    async def _listen(self) -> None:
        # The base class's listener, without aiohttp's request decompression: the
        # backend reads Content-Encoding itself, as Loki and OTLP receivers do.
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2,
                               auto_decompress=False)
        await runner.setup()
        ssl_context = self._server_ssl() if self._use_tls else None
        site = web.TCPSite(runner, "127.0.0.1", self._port, ssl_context=ssl_context,
                           reuse_address=True)
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]


def decode_body(body: bytes, encoding: str, supported: tuple[str, ...]) -> bytes:
    """The request body without its Content-Encoding; BadRequest(400) when it cannot be."""
    encoding = encoding.strip().lower()
    if encoding not in supported:
        raise BadRequest(400, f'Content-Encoding "{encoding}" not supported\n')
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, EOFError, zlib.error) as e:
        raise BadRequest(400, f"{encoding}: invalid body: {e}\n") from None
    return body


# --- Loki ------------------------------------------------------------------------------

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TENANT_CHARS = re.compile(r"[a-zA-Z0-9!\-_.*'()]*")
_INT64 = re.compile(r"[+-]?[0-9]+")
SINGLE_TENANT = "fake"  # Loki's tenant when auth_enabled is false
_NS = 1_000_000_000


@dataclass(frozen=True)
class LokiEntry:
    tenant: str
    labels: dict[str, str]
    time_ns: int
    line: str
    metadata: dict[str, str]


@dataclass
class _Stream:
    entries: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    newest_ns: int | None = None
    seen: set[tuple[int, str]] = field(default_factory=set)


def _go_time(time_ns: int) -> str:
    """A time as Go's time.Time.String() prints it in UTC."""
    seconds, nanos = divmod(time_ns, _NS)
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + " +0000 UTC"


def _rfc3339(time_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time_ns // _NS))


def labels_string(labels: dict[str, str]) -> str:
    """Loki's text form of a label set: `{a="1", b="2"}`, sorted by name."""
    inner = ", ".join(f"{k}={orjson.dumps(labels[k]).decode()}" for k in sorted(labels))
    return "{" + inner + "}"


class FakeLoki(LoopbackBackend):
    """A Loki push endpoint on loopback; see the module docstring."""

    _display_name = "FakeLoki"
    _thread_name = "fake-loki"

    def __init__(
        self,
        *,
        tls: bool = False,
        token: str | None = None,
        multi_tenant: bool = False,
        unordered_writes: bool = True,
        max_chunk_age_s: float = 7200.0,
        max_label_names: int = 15,
        max_label_name_length: int = 1024,
        max_label_value_length: int = 2048,
        max_line_size: int = 256 * 1024,
        reject_old_samples: bool = True,
        reject_old_samples_max_age_s: float = 7 * 86400.0,
        creation_grace_period_s: float = 600.0,
        allow_structured_metadata: bool = True,
        max_structured_metadata_size: int = 64 * 1024,
        max_structured_metadata_entries: int = 128,
    ) -> None:
        super().__init__(tls=tls, token=token)
        self.multi_tenant = multi_tenant
        self.unordered_writes = unordered_writes
        self.max_chunk_age_s = max_chunk_age_s
        self.max_label_names = max_label_names
        self.max_label_name_length = max_label_name_length
        self.max_label_value_length = max_label_value_length
        self.max_line_size = max_line_size
        self.reject_old_samples = reject_old_samples
        self.reject_old_samples_max_age_s = reject_old_samples_max_age_s
        self.creation_grace_period_s = creation_grace_period_s
        self.allow_structured_metadata = allow_structured_metadata
        self.max_structured_metadata_size = max_structured_metadata_size
        self.max_structured_metadata_entries = max_structured_metadata_entries
        self._streams: dict[str, dict[str, _Stream]] = {}  # tenant -> labels string -> stream
        self._stream_labels: dict[str, dict[str, str]] = {}
        self._bucket: tuple[float, float, float, float] | None = None  # rate, burst, level, t
        self._data_lock = threading.Lock()

    # -- what was stored

    def entries(self, tenant: str | None = None) -> list[LokiEntry]:
        """Every stored entry of `tenant` (None: all tenants), stream by stream, each
        stream in the order Loki would return it (by time, then arrival)."""
        out: list[LokiEntry] = []
        with self._data_lock:
            for name, streams in self._streams.items():
                if tenant is not None and name != tenant:
                    continue
                for key, stream in streams.items():
                    labels = self._stream_labels[key]
                    ordered = sorted(stream.entries, key=lambda e: e[0])
                    out.extend(LokiEntry(name, dict(labels), t, line, dict(md))
                               for t, line, md in ordered)
        return out

    def streams(self, tenant: str = SINGLE_TENANT) -> dict[str, list[LokiEntry]]:
        """Stored entries of a tenant per stream (its labels string)."""
        out: dict[str, list[LokiEntry]] = {}
        for entry in self.entries(tenant):
            out.setdefault(labels_string(entry.labels), []).append(entry)
        return out

    def arrival_order(self, tenant: str = SINGLE_TENANT) -> Iterator[tuple[str, int, str]]:
        """(labels string, time, line) of each stored entry in the order it was stored."""
        with self._data_lock:
            items = [(key, stream.entries[:]) for key, stream in
                     self._streams.get(tenant, {}).items()]
        for key, entries in items:
            for t, line, _ in entries:
                yield key, t, line

    def clear(self) -> None:
        with self._data_lock:
            self._streams.clear()
        with self._lock:
            self.requests.clear()

    def rate_limit(self, bytes_per_s: float | None, burst: float | None = None) -> None:
        """Loki's ingestion rate limit (a token bucket of line bytes); None: no limit."""
        with self._data_lock:
            if bytes_per_s is None:
                self._bucket = None
            else:
                size = burst if burst is not None else bytes_per_s
                self._bucket = (bytes_per_s, size, size, time.monotonic())

    # -- the push API

    async def _route(self, request: web.Request, body: bytes) -> web.Response:
        if request.path == "/ready" and request.method == "GET":
            return web.Response(status=200, text="ready\n")
        if request.path != "/loki/api/v1/push":
            return web.Response(status=404, text="404 page not found\n")
        if request.method != "POST":
            return web.Response(status=405, text="Method Not Allowed\n")
        tenant = self._tenant(request)
        raw = decode_body(body, request.headers.get("Content-Encoding", ""),
                          ("", "gzip", "deflate", "snappy"))
        content_type = request.headers.get("Content-Type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if not media:
            raise BadRequest(400, "mime: no media type\n")
        if media != "application/json":
            raise BadRequest(415, "this loopback Loki decodes JSON only, not protobuf+snappy\n")
        streams = _parse_push(raw)
        return self._push(tenant, streams)

    def _tenant(self, request: web.Request) -> str:
        if not self.multi_tenant:
            return SINGLE_TENANT
        org = request.headers.get("X-Scope-OrgID", "")
        if not org:
            raise BadRequest(401, "no org id\n")
        if org in (".", ".."):
            raise BadRequest(401, "tenant ID is '.' or '..'\n")
        if len(org) > 150:
            raise BadRequest(401, "tenant ID is too long: max 150 characters\n")
        if not _TENANT_CHARS.fullmatch(org):
            bad = next(c for c in org if not _TENANT_CHARS.fullmatch(c))
            raise BadRequest(401, f"tenant ID '{org}' contains unsupported character '{bad}'\n")
        return org

    def _push(self, tenant: str, streams: list[tuple[dict[str, str], list[Any]]]) -> web.Response:
        now_ns = time.time_ns()
        error: str | None = None
        valid: list[tuple[str, dict[str, str], list[tuple[int, str, dict[str, str]]]]] = []
        line_bytes = 0
        for labels, values in streams:
            if not values:
                continue
            try:
                key, clean = self._validate_labels(labels)
            except BadRequest as e:
                error = e.text
                continue
            kept = []
            for entry in values:
                problem = self._validate_entry(key, entry, now_ns)
                if problem:
                    error = problem
                    continue
                kept.append(entry)
                line_bytes += len(entry[1].encode())
            valid.append((key, clean, kept))
        if not valid:
            return _answer(error)
        with self._data_lock:
            if not self._take_tokens(line_bytes):
                lines = sum(len(kept) for _, _, kept in valid)
                rate = int(self._bucket[0]) if self._bucket else 0
                raise BadRequest(429, (
                    f"Ingestion rate limit exceeded for user {tenant} (limit: {rate} bytes/sec)"
                    f" while attempting to ingest '{lines}' lines totaling '{line_bytes}' bytes,"
                    " reduce log volume or contact your Loki administrator to see if the limit"
                    " can be increased\n"))
            ingester_error = None
            for key, clean, kept in valid:
                self._stream_labels[key] = clean
                stream = self._streams.setdefault(tenant, {}).setdefault(key, _Stream())
                problem = self._append(tenant, key, stream, kept)
                if problem:
                    ingester_error = problem
        return _answer(ingester_error or error)

    def _validate_labels(self, labels: dict[str, str]) -> tuple[str, dict[str, str]]:
        text = labels_string(labels)
        for name in sorted(labels):
            if not _LABEL_NAME.fullmatch(name):
                bad = next((c for c in name if not re.fullmatch(r"[a-zA-Z0-9_]", c)), name[:1])
                where = "unexpected character inside braces" if name else "unexpected"
                raise BadRequest(400, f"Error parsing labels '{text}' with error: "
                                      f"1:2: parse error: {where}: {bad!r}\n")
        clean = {k: v for k, v in labels.items() if v != ""}
        text = labels_string(clean)
        if not clean:
            raise BadRequest(400, "error at least one label pair is required per stream\n")
        count = len(clean) - (1 if "service_name" in clean else 0)
        if count > self.max_label_names:
            raise BadRequest(400, f"entry for stream '{text}' has {count} label names; "
                                  f"limit {self.max_label_names}\n")
        for name, value in sorted(clean.items()):
            if len(name.encode()) > self.max_label_name_length:
                raise BadRequest(400, f"stream '{text}' has label name too long: '{name}'\n")
            if len(value.encode()) > self.max_label_value_length:
                raise BadRequest(400, f"stream '{text}' has label value too long: '{value}'\n")
        return text, clean

    def _validate_entry(self, key: str, entry: tuple[int, str, dict[str, str]],
                        now_ns: int) -> str | None:
        ts, line, metadata = entry
        oldest = now_ns - int(self.reject_old_samples_max_age_s * _NS)
        if self.reject_old_samples and ts < oldest:
            return (f"entry for stream '{key}' has timestamp too old: {_rfc3339(ts)}, "
                    f"oldest acceptable timestamp is: {_rfc3339(oldest)}\n")
        if ts > now_ns + int(self.creation_grace_period_s * _NS):
            return f"entry for stream '{key}' has timestamp too new: {_rfc3339(ts)}\n"
        size = len(line.encode())
        if self.max_line_size and size > self.max_line_size:
            return (f"Max entry size '{self.max_line_size}' bytes exceeded for stream '{key}' "
                    f"while adding an entry with length '{size}' bytes\n")
        if metadata:
            if not self.allow_structured_metadata:
                return (f"stream '{key}' includes structured metadata, but this feature is "
                        "disallowed. Please see `limits_config.allow_structured_metadata` or "
                        "contact your Loki administrator to enable it.\n")
            md_size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
            if md_size > self.max_structured_metadata_size:
                return (f"stream '{key}' has structured metadata too large: '{md_size}' bytes,"
                        f" limit: '{self.max_structured_metadata_size}' bytes.\n")
            if len(metadata) > self.max_structured_metadata_entries:
                return (f"stream '{key}' has too many structured metadata labels: "
                        f"'{len(metadata)}', limit: '{self.max_structured_metadata_entries}'.\n")
        return None

    def _append(self, tenant: str, key: str, stream: _Stream,
                entries: list[tuple[int, str, dict[str, str]]]) -> str | None:
        refused: list[str] = []
        window_ns = int(self.max_chunk_age_s * _NS / 2)
        for ts, line, metadata in entries:
            if (ts, line) in stream.seen:
                continue  # Loki drops an exact duplicate silently
            newest = stream.newest_ns
            if newest is not None and self.unordered_writes and ts < newest - window_ns:
                refused.append(
                    f"entry with timestamp {_go_time(ts)} ignored, reason: 'entry too far "
                    f"behind, entry timestamp is: {_rfc3339(ts)}, oldest acceptable timestamp "
                    f"is: {_rfc3339(newest - window_ns)}',\n")
                continue
            if newest is not None and not self.unordered_writes and ts < newest:
                refused.append(f"entry with timestamp {_go_time(ts)} ignored, reason: "
                               "'entry out of order',\n")
                continue
            stream.entries.append((ts, line, metadata))
            stream.seen.add((ts, line))
            stream.newest_ns = ts if newest is None else max(newest, ts)
        if not refused:
            return None
        return ("".join(refused[:10]) + f"user '{tenant}', total ignored: {len(refused)} out "
                f"of {len(entries)} for stream: {key}\n")

    def _take_tokens(self, n: int) -> bool:
        if self._bucket is None:
            return True
        rate, burst, level, then = self._bucket
        now = time.monotonic()
        level = min(burst, level + (now - then) * rate)
        if n > level:
            self._bucket = (rate, burst, level, now)
            return False
        self._bucket = (rate, burst, level - n, now)
        return True


def _answer(error: str | None) -> web.Response:
    if error is None:
        return web.Response(status=204)
    return web.Response(status=400, text=error)


def _parse_push(raw: bytes) -> list[tuple[dict[str, str], list[Any]]]:
    """The streams of a JSON push body, checked as Loki's decoder checks them."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(400, f"loghttp.PushRequest: {e}\n") from None
    if not isinstance(doc, dict):
        raise BadRequest(400, "loghttp.PushRequest: ReadObjectCB: expect { or n\n")
    streams = doc.get("streams") or []
    if not isinstance(streams, list):
        raise BadRequest(400, "loghttp.PushRequest.Streams: decode slice: expect [ or n\n")
    out = []
    for stream in streams:
        if not isinstance(stream, dict):
            raise BadRequest(400, "loghttp.PushRequest.Streams: expect { or n\n")
        labels = stream.get("stream") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise BadRequest(400, "loghttp.LabelSet: Value looks like Number/Boolean/None, "
                                  "but can't find its end: ',' or '}' symbol\n")
        values = stream.get("values") or []
        if not isinstance(values, list):
            raise BadRequest(400, "error reading entries: expect [\n")
        out.append((labels, [_parse_value(v) for v in values]))
    return out


def _parse_value(value: Any) -> tuple[int, str, dict[str, str]]:
    if not isinstance(value, list) or not 2 <= len(value) <= 3:
        raise BadRequest(400, "error reading entry: array must contains 2 values\n")
    ts, line = value[0], value[1]
    if not isinstance(ts, str):
        raise BadRequest(400, "ReadString: expects \" or n, but found a number\n")
    if not _INT64.fullmatch(ts) or not -(1 << 63) <= int(ts) < 1 << 63:
        raise BadRequest(400, f"error reading entry timestamp: strconv.ParseInt: parsing "
                              f"{ts!r}: invalid syntax\n")
    if not isinstance(line, str):
        raise BadRequest(400, "ReadString: expects \" or n\n")
    metadata: dict[str, str] = {}
    if len(value) == 3:
        md = value[2]
        if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
            raise BadRequest(400, "error reading structured metadata: expects an object of "
                                  "strings\n")
        metadata = md
    return int(ts), line, metadata
