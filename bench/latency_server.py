"""The latency receivers of the benchmarks, each in a process of its own.

A loopback Elasticsearch `_bulk` (`LatencyEs`, simnode's `EsBulkServer`) or Loki push
(`LatencyLoki`, simnode's `FakeLoki`) validates and answers every request as the real
server does, but instead of keeping what it received it notes, in a `LatencyBook`, each
stamped line (`w<ID> s<SEQ> t<REALTIME_NS> `, written by the benchmarks' C writer) and
the time it arrived.  Running it in its own process keeps its work (decompressing and
parsing every body) off the benchmark's interpreter and its sampler threads: on a
2-core machine a receiver sharing the benchmark's GIL answered slowly enough to fill a
shipper's sink buffer.

Control endpoints on the same port, on paths neither API uses (Elasticsearch index
names cannot start with `_`, Loki serves `/loki/...` and `/ready`):

    GET  /_latency/unique              {"unique": N}  distinct stamped lines received
    GET  /_latency/warmups             {"warmups": N} lines of the warm-up writer
    GET  /_latency/summary?expected=N  counts and latency quantiles (LatencyBook.summary)
    POST /_latency/reset               forget everything received so far

    python -m bench.latency_server es|loki [PORT]

prints the port it listens on (PORT 0 or none: an ephemeral one) as its first line and
serves until SIGTERM or SIGINT, or until its parent exits.  `latency_receiver(kind)` in
the benchmarks starts it and hands back a `LatencyReceiver` client.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from simnode.esbulk import EsBulkServer, Received
from simnode.loki import FakeLoki, _Stream
from simnode.node import stop_process

REPO = Path(__file__).resolve().parents[1]
MARK = re.compile(rb"w(\d+) s(\d+) t(\d+) ")
WARMUP_ID = 99  # a writer with this id only shows that a shipper is up: not counted
CONTROL = "/_latency/"
KINDS = ("es", "loki")


class LatencyBook:
    """Receipt of stamped lines: unique lines per writer and write -> receipt latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[int] = set()  # writer << 40 | sequence number
        self._latency_ns = array("q")
        self.duplicates = 0
        self.warmups = 0

    def note(self, text: bytes, received_ns: int) -> None:
        found = MARK.findall(text)
        with self._lock:
            for writer, seq, written in found:
                w = int(writer)
                if w == WARMUP_ID:
                    self.warmups += 1
                    continue
                key = w << 40 | int(seq)
                if key in self._seen:
                    self.duplicates += 1
                    continue
                self._seen.add(key)
                self._latency_ns.append(received_ns - int(written))

    def unique(self) -> int:
        with self._lock:
            return len(self._seen)

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()
            self._latency_ns = array("q")
            self.duplicates = 0
            self.warmups = 0

    def summary(self, expected: int) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self._latency_ns)
            got = len(self._seen)
            duplicates = self.duplicates
        return {
            "expected": expected,
            "received": got,
            "lost": expected - got,
            "duplicates": duplicates,
            "p50_s": percentile(lat, 0.50),
            "p99_s": percentile(lat, 0.99),
            "max_s": lat[-1] / 1e9 if lat else None,
            "latency_quantiles_s": [percentile(lat, i / 100) for i in range(101)] if lat else [],
        }


def percentile(sorted_ns: list[int], q: float) -> float | None:
    if not sorted_ns:
        return None
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e9


def control_answer(book: LatencyBook, method: str, path: str,
                   query: dict[str, str]) -> web.Response:
    """The answer of a control endpoint (`path` starts with CONTROL)."""
    name = path[len(CONTROL):]
    if method == "GET" and name == "unique":
        return web.json_response({"unique": book.unique()})
    if method == "GET" and name == "warmups":
        return web.json_response({"warmups": book.warmups})
    if method == "GET" and name == "summary":
        try:
            expected = int(query.get("expected", "0"))
        except ValueError:
            return web.json_response({"error": "expected: not an integer"}, status=400)
        return web.json_response(book.summary(expected))
    if method == "POST" and name == "reset":
        book.reset()
        return web.json_response({"reset": True})
    return web.json_response({"error": f"no control endpoint {method} {path}"}, status=404)


class LatencyLoki(FakeLoki):
    """FakeLoki that validates every push but keeps only receipt times, not entries."""

    def __init__(self, book: LatencyBook) -> None:
        super().__init__()
        self.book = book
        self._received_ns = 0

    async def _route(self, request: web.Request, body: bytes) -> web.Response:
        if request.path.startswith(CONTROL):
            return control_answer(self.book, request.method, request.path, dict(request.query))
        self._received_ns = time.time_ns()
        return await super()._route(request, body)

    def _append(self, tenant: str, key: str, stream: _Stream,
                entries: list[tuple[int, str, dict[str, str]]]) -> str | None:
        self.book.note("\n".join(line for _, line, _ in entries).encode(), self._received_ns)
        return None

    def _log(self, request: web.Request, body: bytes, response: web.Response,
             arrived: float) -> None:
        """Requests are not kept (memory stays flat over a long run)."""


class LatencyEs(EsBulkServer):
    """EsBulkServer that notes each stamped line's receipt and answers without keeping it."""

    def __init__(self, book: LatencyBook) -> None:
        super().__init__()
        self.book = book

    async def _respond(self, received: Received) -> web.StreamResponse:
        if received.path.startswith(CONTROL):
            with self._lock:
                self.received.clear()
            return control_answer(self.book, received.method, received.path, received.query)
        self.book.note(received.body, time.time_ns())
        response = await super()._respond(received)
        with self._lock:
            self.received.clear()  # bodies are not needed; keep memory flat
            self.docs.clear()
        return response


# --- the process ------------------------------------------------------------------------


def serve(kind: str, port: int) -> None:
    """Serve `kind` on 127.0.0.1:`port` until SIGTERM/SIGINT or the parent's exit."""
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before the server thread starts (it inherits the mask): only sigwait sees them.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    _die_with_parent(signal.SIGTERM)
    # The book holds a set of every line seen (millions of entries): with the default
    # thresholds the cyclic GC walks it again and again while requests allocate, a third
    # of the receiver's CPU at 100K lines/s.  Rare collections, the start-up objects frozen.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    book = LatencyBook()
    server: LatencyEs | LatencyLoki = LatencyEs(book) if kind == "es" else LatencyLoki(book)
    server._port = port  # LoopbackHttpsServer listens on _port (0: an ephemeral one)
    with server:
        print(server.port, flush=True)
        signal.sigwait(stop_signals)


def _die_with_parent(sig: int) -> None:
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig))


def main() -> None:
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in KINDS:
        raise SystemExit(f"usage: python -m bench.latency_server {'|'.join(KINDS)} [PORT]")
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 0)


# --- the client -------------------------------------------------------------------------


class LatencyReceiver:
    """A running latency server, seen from the benchmark: the LatencyBook's methods."""

    def __init__(self, kind: str, port: int, pid: int) -> None:
        self.kind, self.port, self.pid = kind, port, pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def unique(self) -> int:
        return int(self._call("GET", "unique")["unique"])

    @property
    def warmups(self) -> int:
        return int(self._call("GET", "warmups")["warmups"])

    def reset(self) -> None:
        self._call("POST", "reset")

    def summary(self, expected: int) -> dict[str, Any]:
        return dict(self._call("GET", f"summary?expected={int(expected)}", timeout=120))

    def _call(self, method: str, what: str, timeout: float = 30) -> dict[str, Any]:
        request = urllib.request.Request(self.url + CONTROL + what, method=method,
                                         data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer


@contextlib.contextmanager
def latency_receiver(kind: str, start_timeout: float = 60) -> Iterator[LatencyReceiver]:
    """Start `python -m bench.latency_server kind` and yield its client once it answers;
    stop it afterwards."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    proc = subprocess.Popen([sys.executable, "-m", "bench.latency_server", kind, "0"],
                            stdout=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.monotonic() + start_timeout
        port = _read_port(proc, deadline)
        receiver = LatencyReceiver(kind, port, proc.pid)
        _wait_answering(receiver, proc, deadline)
        yield receiver
    finally:
        _stop(proc)


def _read_port(proc: subprocess.Popen[bytes], deadline: float) -> int:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the latency server did not tell its port")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 64)
            if not chunk:
                raise RuntimeError(f"the latency server exited ({proc.wait()})")
            line += chunk
    return int(line.decode().strip())


def _wait_answering(receiver: LatencyReceiver, proc: subprocess.Popen[bytes],
                    deadline: float) -> None:
    while True:
        try:
            receiver.unique()
            return
        except (OSError, urllib.error.URLError):
            if proc.poll() is not None:
                raise RuntimeError(f"the latency server exited ({proc.returncode})") from None
            if time.monotonic() > deadline:
                raise TimeoutError("the latency server does not answer") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, signal.SIGTERM, 30)
    if proc.stdout is not None:
        proc.stdout.close()


if __name__ == "__main__":
    main()
