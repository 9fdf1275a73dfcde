"""Loopback HTTP(S) servers for the sink tests.

`RecordingServer` records every request as it arrived on the wire (the body is decoded
from gzip by the test, not by aiohttp, so a test sees what was really sent), answers from
a script, tracks how many requests were in flight at once, and can require a client
certificate (mTLS).

`EsBulkServer` implements Elasticsearch's `_bulk` API as documented, including what the
noida-db emulator does not do: whole-request errors (400 for a malformed action line or an
empty body, 413 above `max_content_length`, 401 without the expected credentials), a
scripted per-item answer (429/503 for chosen documents), `create` conflicts (409
`version_conflict_engine_exception`), dynamic-mapping conflicts (400
`document_parsing_exception`) and `filter_path`.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import web

from simnode.loopback import LoopbackHttpsServer
from simnode.tls import TLSFiles


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    raw: bytes  # the body as sent (compressed or not)
    body: bytes  # decoded from gzip when Content-Encoding says so


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before answering (timeouts, in-flight bounds)


class RecordingServer(LoopbackHttpsServer):
    """Answers every request from `script` (a queue; `default` when empty) and records it."""

    _display_name: ClassVar[str] = "recording server"
    _thread_name: ClassVar[str] = "recording-server"

    def __init__(
        self,
        *,
        https: bool = False,
        tls: TLSFiles | None = None,
        client_ca: str | None = None,
        default: Answer | None = None,
    ) -> None:
        super().__init__(token=None, tls=tls)
        self._https = https
        self._client_ca = client_ca
        self.default = default or Answer()
        self.script: deque[Answer] = deque()
        self.received: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0  # TCP connections that carried requests
        self._transports: set[object] = set()
        self.release = threading.Event()  # set: delayed answers go out at once

    @property
    def url(self) -> str:
        return f"{'https' if self._https else 'http'}://127.0.0.1:{self.port}"

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def answer(self, *answers: Answer) -> None:
        with self._lock:
            self.script.extend(answers)

    def _server_ssl(self) -> ssl.SSLContext:
        ctx = super()._server_ssl()
        if self._client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self._client_ca)
        return ctx

    async def _listen(self) -> None:
        # As the base class does, but plain HTTP when asked, and without decompressing
        # request bodies (the test checks what was sent).
        app = web.Application(client_max_size=256 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2, auto_decompress=False)
        await runner.setup()
        ssl_context = self._server_ssl() if self._https else None
        site = web.TCPSite(runner, "127.0.0.1", self._port, ssl_context=ssl_context,
                           reuse_address=True)
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = gzip.decompress(raw) if headers.get("content-encoding") == "gzip" else raw
        received = Received(request.method, request.path, dict(request.query), headers, raw,
                            body)
        with self._lock:
            self.received.append(received)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if request.transport not in self._transports:
                self._transports.add(request.transport)
                self.connections += 1
        try:
            return await self._respond(received)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _respond(self, received: Received) -> web.StreamResponse:
        with self._lock:
            answer = self.script.popleft() if self.script else self.default
        if answer.delay_s:
            deadline = asyncio.get_running_loop().time() + answer.delay_s
            while asyncio.get_running_loop().time() < deadline and not self.release.is_set():
                await asyncio.sleep(0.01)
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


# --- Elasticsearch _bulk -----------------------------------------------------------------


def _error(status: int, etype: str, reason: str) -> tuple[int, bytes]:
    cause = {"type": etype, "reason": reason}
    return status, orjson.dumps({"error": {"root_cause": [cause], **cause}, "status": status})


_JSON_KINDS = {dict: "object", list: "array", str: "text", int: "long", float: "float",
               bool: "boolean"}


class EsBulkServer(RecordingServer):
    """Elasticsearch's `_bulk` on loopback; documents kept per index.

    `item_plan[marker]`: statuses given, one per occurrence, to documents whose message
    contains `marker` (429 and 5xx as Elasticsearch gives them), before normal handling.
    `auth`: the exact Authorization header required (401 otherwise).
    """

    _display_name: ClassVar[str] = "Elasticsearch _bulk server"
    _thread_name: ClassVar[str] = "esbulk-server"

    def __init__(self, *, max_content_length: int = 100 << 20, auth: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_content_length = max_content_length
        self.auth = auth
        self.item_plan: dict[str, list[int]] = {}
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}  # index -> _id -> source
        self._mappings: dict[str, dict[str, str]] = {}
        self._next_id = 0

    def count(self, index: str | None = None) -> int:
        with self._lock:
            if index is not None:
                return len(self.docs.get(index, {}))
            return sum(len(d) for d in self.docs.values())

    def sources(self, index: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.docs.get(index, {}).values())

    async def _respond(self, received: Received) -> web.StreamResponse:
        with self._lock:
            scripted = self.script.popleft() if self.script else None
        if scripted is not None:  # a whole-request answer the test asked for
            return web.Response(status=scripted.status, body=scripted.body,
                                headers=scripted.headers)
        status, body = self._bulk(received)
        return web.Response(status=status, body=body, content_type="application/json")

    def _bulk(self, r: Received) -> tuple[int, bytes]:
        parts = r.path.strip("/").split("/")
        if r.method not in ("POST", "PUT") or parts[-1] != "_bulk" or len(parts) > 2:
            return _error(404, "not_found", f"no handler found for uri [{r.path}]")
        if self.auth is not None and r.headers.get("authorization") != self.auth:
            return _error(401, "security_exception", "missing authentication credentials")
        if len(r.raw) > self.max_content_length:
            return 413, b""
        ctype = r.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in ("application/x-ndjson", "application/json"):
            return _error(406, "media_type_header_exception", f"invalid media-type [{ctype}]")
        default_index = parts[0] if len(parts) == 2 else None
        try:
            pairs = _parse_bulk(r.body)
        except ValueError as e:
            return _error(400, "illegal_argument_exception", str(e))
        if not pairs:
            return _error(400, "action_request_validation_exception",
                          "Validation Failed: 1: no requests added;")
        with self._lock:
            items = [self._item(op, meta, source, default_index) for op, meta, source in pairs]
        errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
        answer: dict[str, Any] = {"took": 1, "errors": errors, "items": items}
        if "filter_path" in r.query:
            answer = _filtered(answer, r.query["filter_path"])
        return 200, orjson.dumps(answer)

    def _item(self, op: str, meta: dict[str, Any], source: dict[str, Any],
              default_index: str | None) -> dict[str, Any]:
        index = meta.get("_index", default_index)
        if index is None:
            return {op: _item_error(400, "action_request_validation_exception",
                                    "index is missing")}
        doc_id = meta.get("_id")
        message = str(source.get("message", ""))
        for marker, statuses in self.item_plan.items():
            if marker in message and statuses:
                status = statuses.pop(0)
                etype = "es_rejected_execution_exception" if status == 429 else "unavailable"
                return {op: {"_index": index, **_item_error(status, etype, "scripted")}}
        if doc_id is None:
            self._next_id += 1
            doc_id = f"auto{self._next_id}"
        docs = self.docs.setdefault(index, {})
        if op == "create" and doc_id in docs:
            return {op: {"_index": index, "_id": doc_id, **_item_error(
                409, "version_conflict_engine_exception",
                f"[{doc_id}]: version conflict, document already exists")}}
        conflict = self._mapping_conflict(index, source)
        if conflict is not None:
            return {op: {"_index": index, "_id": doc_id, **_item_error(
                400, "document_parsing_exception", conflict)}}
        created = doc_id not in docs
        docs[doc_id] = source
        return {op: {"_index": index, "_id": doc_id, "result": "created" if created
                     else "updated", "status": 201 if created else 200}}

    def _mapping_conflict(self, index: str, source: dict[str, Any]) -> str | None:
        mapping = self._mappings.setdefault(index, {})
        kinds = {k: _JSON_KINDS.get(type(v), "null") for k, v in source.items()}
        for key, kind in kinds.items():
            if kind == "long" and mapping.get(key) == "float":
                continue
            if key in mapping and mapping[key] != kind and kind != "null":
                return f"failed to parse field [{key}] of type [{mapping[key]}]"
        for key, kind in kinds.items():
            mapping.setdefault(key, kind)
        return None


def _item_error(status: int, etype: str, reason: str) -> dict[str, Any]:
    return {"status": status, "error": {"type": etype, "reason": reason}}


def _parse_bulk(body: bytes) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Action/source pairs; ValueError (a whole-request 400, as Elasticsearch) when an
    action line is malformed."""
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif body:
        raise ValueError("The bulk request must be terminated by a newline [\\n]")
    out = []
    i = 0
    while i < len(lines):
        try:
            action = orjson.loads(lines[i])
        except orjson.JSONDecodeError:
            raise ValueError(f"Malformed action/metadata line [{i + 1}], expected "
                             "START_OBJECT but found [VALUE_STRING]") from None
        if not isinstance(action, dict) or len(action) != 1:
            raise ValueError(f"Malformed action/metadata line [{i + 1}], expected "
                             "a simple value for field [op]")
        ((op, meta),) = action.items()
        if op not in ("create", "index") or not isinstance(meta, dict):
            raise ValueError(f"Malformed action/metadata line [{i + 1}], expected "
                             f"field [create] or [index] but found [{op}]")
        if i + 1 >= len(lines):
            raise ValueError("The bulk request must be terminated by a newline [\\n]")
        try:
            source = orjson.loads(lines[i + 1])
        except orjson.JSONDecodeError:
            raise ValueError(f"failed to parse source at line [{i + 2}]") from None
        out.append((op, meta, source))
        i += 2
    return out


def _filtered(answer: dict[str, Any], filter_path: str) -> dict[str, Any]:
    """The subset of `filter_path` this server knows: top-level keys and items.*.<key>."""
    keep_top = set()
    item_keys = set()
    for path in filter_path.split(","):
        if path.startswith("items.*."):
            item_keys.add(path[len("items.*."):])
        else:
            keep_top.add(path)
    out = {k: v for k, v in answer.items() if k in keep_top}
    if item_keys:
        out["items"] = [{op: {k: v for k, v in res.items() if k in item_keys}
                         for op, res in item.items()} for item in answer["items"]]
    return out
