"""Elasticsearch `_bulk`: records as NDJSON action/source pairs, answers read item by item.

Where documents go:

- a data stream (default): `create` actions into `elasticsearch.index`
  (`logs-podtap-default`), records with `@timestamp`;
- an index (`data_stream: false`): `index` actions; `elasticsearch.index` may hold a
  strftime date pattern of the record's UTC day (`logs-%Y.%m.%d`).

A constant target goes in the URL path (`POST <url>/<index>/_bulk`) and the actions carry
no `_index`: each item is smaller, and it works where explicit indices in the body are
forbidden (`rest.action.multi.allow_explicit_index: false`, index-scoped proxies). Only a
dated index, whose name changes with each record's day, is named in the action
(`POST <url>/_bulk`, `{"index":{"_index":"logs-2026.12.01"}}`).

`document_id: true` gives each record a deterministic `_id` (blake2b-128 of container id,
time, stream, partial flag and message, base64url), so a resend does not duplicate: with
`create` Elasticsearch answers 409 `version_conflict_engine_exception` for a document that
is already there, which counts as delivered; with `index` it overwrites the same document.
Lines of one write share their timestamp, so identical lines of one write are told apart by
their occurrence number.

The answer is asked for with `filter_path` (errors, items' status and error only): a
10,000-item answer shrinks from ~2 MB to ~200 KB.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import struct
import time
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import orjson

from agent.config import SinkConfig
from agent.kube.model import ContainerMeta
from agent.records import ContainerEncoder, RecordFormat
from agent.sinks.base import Batch, ItemEncoder, Outcome, Response
from agent.sinks.retry import classify_status, parse_retry_after

CONTENT_TYPE: Final = "application/x-ndjson"
FILTER_PATH: Final = "errors,items.*.error,items.*.status"

_NS_PER_DAY: Final = 86_400 * 1_000_000_000
_EXCERPT_CHARS: Final = 500
_ID_HEAD: Final = struct.Struct("<qBB")  # time_ns, stream, partial
_DAY_CACHE_MAX: Final = 64


def es_record_format(cfg: SinkConfig, fmt: RecordFormat) -> RecordFormat:
    """The records of this sink: `@timestamp` as the time key, labels de-dotted unless
    the sink says otherwise (`a.b` and `a` as label keys would collide in the mapping)."""
    dedot = True if cfg.dedot_labels is None else cfg.dedot_labels
    return dataclasses.replace(
        fmt, time_key="@timestamp", timestamp_key_es=False, dedot_labels=dedot
    )


class _DatedIndex:
    """The action head of a dated index per UTC day, formatted once per day."""

    __slots__ = ("_heads", "_op", "_pattern")

    def __init__(self, pattern: str, op: bytes) -> None:
        self._pattern = pattern
        self._op = op
        self._heads: dict[int, bytes] = {}

    def head(self, day: int) -> bytes:
        head = self._heads.get(day)
        if head is None:
            name = time.strftime(self._pattern, time.gmtime(day * 86_400))
            head = b'{"' + self._op + b'":{"_index":' + orjson.dumps(name)
            if len(self._heads) >= _DAY_CACHE_MAX:
                self._heads.clear()
            self._heads[day] = head
        return head


class BulkItemEncoder:
    """One container's lines as `_bulk` items: action line + source line, each ending
    with a newline, so a body is the items joined with nothing."""

    __slots__ = (
        "_dated",
        "_day",
        "_day_head",
        "_dups",
        "_first",
        "_hash",
        "_head",
        "_last_ns",
        "_plain",
        "_plain_item",
        "_record",
        "group",
    )

    def __init__(
        self,
        meta: ContainerMeta,
        fmt: RecordFormat,
        op: bytes,
        dated: _DatedIndex | None,
        document_id: bool,
    ) -> None:
        self.group = b""
        self._dated = dated
        self._head = b'{"' + op + b'":{'  # the action up to its members
        self._plain = self._head + b"}}\n"  # the whole action line without _index or _id
        plain = document_id is False and dated is None  # the default: a data stream
        # Plain: the whole item (action line, record, newline) from the record's templates.
        self._record = (ContainerEncoder(meta, fmt, self._plain, b"\n") if plain
                        else ContainerEncoder(meta, fmt)).encode
        self._plain_item = plain
        self._day = -1
        self._day_head = b""
        self._hash = (
            hashlib.blake2b(meta.container_id.encode() + b"\0", digest_size=16)
            if document_id
            else None
        )
        self._last_ns = -1
        self._first = b""
        self._dups: dict[bytes, int] | None = None

    def encode(self, time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
        record = self._record(time_ns, stream, message, partial)
        if self._plain_item:
            return record
        if self._dated is not None:
            day = time_ns // _NS_PER_DAY
            if day != self._day:
                self._day = day
                self._day_head = self._dated.head(day)
            head = self._day_head
            if self._hash is None:
                return head + b"}}\n" + record + b"\n"
            doc_id = self._doc_id(time_ns, stream, message, partial)
            return head + b',"_id":"' + doc_id + b'"}}\n' + record + b"\n"
        doc_id = self._doc_id(time_ns, stream, message, partial)
        return self._head + b'"_id":"' + doc_id + b'"}}\n' + record + b"\n"

    def _doc_id(self, time_ns: int, stream: int, message: bytes, partial: bool) -> bytes:
        assert self._hash is not None
        h = self._hash.copy()
        h.update(_ID_HEAD.pack(time_ns, stream, partial))
        h.update(message)
        digest = h.digest()
        if time_ns != self._last_ns:
            self._last_ns = time_ns
            self._first = digest
            self._dups = None
        else:  # another line of the same write: number the repeats of identical lines
            if self._dups is None:
                self._dups = {self._first: 1}
            seen = self._dups.get(digest, 0)
            self._dups[digest] = seen + 1
            if seen:
                h.update(b"#%d" % seen)
                digest = h.digest()
        return base64.urlsafe_b64encode(digest)[:22]


class ElasticsearchCodec:
    """`_bulk` requests and their answers; implements `agent.sinks.base.Codec`.

    `url`, `content_type` and `extra_headers` are what the transport is built with.
    """

    def __init__(self, cfg: SinkConfig, fmt: RecordFormat) -> None:
        es = cfg.elasticsearch
        self._fmt = es_record_format(cfg, fmt)
        self._op = b"create" if es.data_stream else b"index"
        self._document_id = es.document_id
        self._ids_are_ours = es.document_id and es.data_stream  # 409 means "already there"
        dated = not es.data_stream and "%" in es.index
        self._dated = _DatedIndex(es.index, self._op) if dated else None
        self.url = bulk_url(cfg.url, None if dated else es.index, es.pipeline)
        self.content_type = CONTENT_TYPE
        self.extra_headers: dict[str, str] = {}
        self.parse_errors = 0  # 2xx answers that could not be read (retried)

    def encoder(self, meta: ContainerMeta) -> ItemEncoder:
        return BulkItemEncoder(meta, self._fmt, self._op, self._dated, self._document_id)

    def body(self, batch: Batch) -> bytes:
        return b"".join(batch.items())

    def outcome(self, batch: Batch, response: Response) -> Outcome:
        verdict = classify_status(response.status)
        if verdict == "retry":
            wait = parse_retry_after(response.headers.get("retry-after"), time.time())
            return Outcome(retry=batch, retry_after_s=wait)
        if verdict == "dead":
            return Outcome(dead=[(batch.items(), _request_error(response))])
        return self._items_outcome(batch, response)

    def _items_outcome(self, batch: Batch, response: Response) -> Outcome:
        answers = _item_answers(response.body, batch.records)
        if answers is None:  # a 2xx we cannot read proves nothing: send again
            self.parse_errors += 1
            return Outcome(retry=batch)
        if not answers:  # "errors": false
            return Outcome(delivered=batch.records)
        out = Outcome()
        retry: dict[bytes, list[bytes]] = {}
        position = 0
        for group, items in batch.groups.items():
            for item in items:
                status, error = answers[position]
                position += 1
                verdict = self._item_verdict(status, error)
                if verdict == "ok":
                    out.delivered += 1
                elif verdict == "retry":
                    retry.setdefault(group, []).append(item)
                else:
                    reason = f"item HTTP {status}: " + orjson.dumps(error).decode()
                    out.dead.append(([item], reason))
        if retry:
            out.retry = _sub_batch(batch, retry)
        return out

    def _item_verdict(self, status: int, error: Any) -> str:
        if 200 <= status <= 299:
            return "ok"
        if (
            status == 409
            and self._ids_are_ours
            and isinstance(error, dict)
            and error.get("type") == "version_conflict_engine_exception"
        ):
            return "ok"  # our deterministic _id is already there: an earlier send landed
        if status == 429 or 500 <= status <= 599:
            return "retry"
        return "dead"


def bulk_url(base: str, index: str | None, pipeline: str) -> str:
    """`<base>/<index>/_bulk` (or `<base>/_bulk`) with filter_path and the pipeline."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/")
    if index is not None:
        path += "/" + quote(index, safe="")
    query = {"filter_path": FILTER_PATH}
    if pipeline:
        query["pipeline"] = pipeline
    return urlunsplit(parts._replace(path=path + "/_bulk", query=urlencode(query, safe=",*")))


def _item_answers(body: bytes, expected: int) -> list[tuple[int, Any]] | None:
    """[] when the answer says no item failed, else each item's (status, error) in order;
    None when the body is not a `_bulk` answer for `expected` items."""
    if body.startswith(b'{"errors":false'):  # the usual answer, as filter_path shapes it
        return []
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("errors"), bool):
        return None
    if doc["errors"] is False:
        return []
    items = doc.get("items")
    if not isinstance(items, list) or len(items) != expected:
        return None
    answers: list[tuple[int, Any]] = []
    for entry in items:
        if not isinstance(entry, dict) or len(entry) != 1:
            return None
        (result,) = entry.values()
        if not isinstance(result, dict) or not isinstance(result.get("status"), int):
            return None
        answers.append((result["status"], result.get("error")))
    return answers


def _sub_batch(batch: Batch, groups: dict[bytes, list[bytes]]) -> Batch:
    items = [item for group in groups.values() for item in group]
    return Batch(
        seq=batch.seq,
        groups=groups,
        records=len(items),
        nbytes=sum(len(item) for item in items),
        created_ns=batch.created_ns,
        attempts=batch.attempts,
    )


def _request_error(response: Response) -> str:
    """Why a whole request was refused, with the start of Elasticsearch's answer."""
    text = response.body[: _EXCERPT_CHARS * 4].decode("utf-8", "replace")
    text = " ".join(text.split())[:_EXCERPT_CHARS] or "(empty body)"
    reason = f"HTTP {response.status}: {text}"
    if response.status == 413:
        reason += (
            " (the request is larger than the server accepts, http.max_content_length in "
            "Elasticsearch or a proxy's limit: lower batch.max_bytes)"
        )
    elif response.status in (401, 403):
        reason += " (check the sink's auth: credentials and the index privileges)"
    return reason
