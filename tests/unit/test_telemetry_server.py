"""The telemetry server's HTTP/1.1 over real sockets: every path, HEAD, errors, limits,
slow and bad clients, keep-alive, many connections; and what the agent imports."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import TelemetryConfig
from agent.sinks.base import SinkStats
from agent.telemetry import ServerLimits, Snapshot, TelemetryServer

T = TypeVar("T")
DEADLINE_S = 60.0  # for any one client step; the machine is shared and loaded
HOST = b"Host: 127.0.0.1\r\n"
PATHS = ("/metrics", "/healthz", "/readyz")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@asynccontextmanager
async def running(
    limits: ServerLimits | None = None,
    snapshot: Callable[[], Snapshot] = Snapshot,
    readiness: Callable[[], list[str]] = list,
) -> AsyncIterator[TelemetryServer]:
    server = TelemetryServer(TelemetryConfig(address="127.0.0.1", port=0), snapshot, readiness,
                             limits)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(body())  # type: ignore[arg-type]


async def connect(server: TelemetryServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_response(reader: asyncio.StreamReader, head: bool = False) -> Response:
    """One answer; every answer must carry a Content-Length (a KeyError fails the test)."""
    async with asyncio.timeout(DEADLINE_S):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        version, status, _reason = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode().lower()] = value.strip().decode()
        length = int(headers["content-length"])
        body = b"" if head else await reader.readexactly(length)
        return Response(int(status), headers, body)


async def closed(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection (EOF, or a reset) with nothing more sent."""
    async with asyncio.timeout(DEADLINE_S):
        try:
            return await reader.read() == b""
        except ConnectionResetError:
            return True


async def request(server: TelemetryServer, raw: bytes, head: bool = False) -> Response:
    """`raw` on a connection of its own; the answer."""
    reader, writer = await connect(server)
    try:
        writer.write(raw)
        return await read_response(reader, head)
    finally:
        writer.close()


def get(path: str, method: str = "GET", extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\n".encode() + HOST + extra + b"\r\n"


# --- the three paths ---

def test_each_path_answers_get_with_its_body_and_length() -> None:
    async def body() -> dict[str, Response]:
        async with running(snapshot=lambda: Snapshot(lines=7)) as server:
            return {p: await request(server, get(p)) for p in PATHS}

    answers = run(body)
    assert (answers["/healthz"].status, answers["/healthz"].body) == (200, b"ok\n")
    assert (answers["/readyz"].status, answers["/readyz"].body) == (200, b"ok\n")
    metrics = answers["/metrics"]
    assert metrics.status == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.body.decode())
               for s in f.samples}
    assert samples["podtap_lines_total"] == 7
    for path in ("/healthz", "/readyz"):
        assert answers[path].headers["content-type"] == "text/plain; charset=utf-8"
    for answer in answers.values():
        assert int(answer.headers["content-length"]) == len(answer.body)
        assert answer.headers["date"].endswith(" GMT")


def test_readyz_not_ready_is_503_with_the_reasons() -> None:
    async def body() -> Response:
        async with running(readiness=lambda: ["probes not attached", "kubelet never answered"]
                           ) as server:
            return await request(server, get("/readyz"))

    answer = run(body)
    assert (answer.status, answer.body) == (503, b"probes not attached\nkubelet never answered\n")


def test_query_strings_are_ignored() -> None:
    async def body() -> Response:
        async with running() as server:
            return await request(server, get("/healthz?verbose=1&x=%20"))

    assert (run(body).status, run(body).body) == (200, b"ok\n")


def test_head_has_the_get_headers_and_no_body() -> None:
    async def body() -> list[tuple[Response, Response, Response]]:
        out = []
        async with running(snapshot=lambda: Snapshot(lines=3)) as server:
            for path in PATHS:
                reader, writer = await connect(server)
                # HEAD, then GET on the same connection: a body sent after the HEAD's
                # headers would be read as the GET's status line.
                writer.write(get(path, "HEAD") + get(path))
                head = await read_response(reader, head=True)
                after = await read_response(reader)
                writer.close()
                out.append((head, after, await request(server, get(path))))
        return out

    for head, after, alone in run(body):
        assert head.status == alone.status == after.status == 200
        assert head.body == b""
        assert head.headers["content-length"] == alone.headers["content-length"]
        assert head.headers["content-type"] == alone.headers["content-type"]
        assert after.body == alone.body or after.headers["content-type"].startswith(
            "text/plain; version")  # /metrics: process_* values move between scrapes


# --- statuses for what the server does not serve ---

@pytest.mark.parametrize("path", ["/", "/metricsx", "/metrics/", "/healthz/", "/HEALTHZ",
                                  "/readyz/../healthz", "/favicon.ico", "//healthz"])
def test_other_paths_are_404_and_the_connection_stays(path: str) -> None:
    async def body() -> tuple[Response, Response, Response]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(get(path) + get(path, "POST") + get("/healthz"))
            answers = (await read_response(reader), await read_response(reader),
                       await read_response(reader))
            writer.close()
            return answers

    missing, posted, health = run(body)
    assert missing.status == posted.status == 404
    assert (health.status, health.body) == (200, b"ok\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                                    "CONNECT", "PROPFIND", "get"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    async def body() -> list[Response]:
        async with running() as server:
            return [await request(server, get(p, method)) for p in PATHS]

    for answer in run(body):
        assert answer.status == 405
        assert answer.headers["allow"] == "GET, HEAD"


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET /healthz\r\n\r\n",
    b"GET  /healthz HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /healthz  HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET healthz HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET http://x/healthz HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /he lthz HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /he\x7flthz HTTP/1.1\r\n" + HOST + b"\r\n",
    b"G(T /healthz HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /healthz HTTP/1.1 extra\r\n" + HOST + b"\r\n",
    b"GET /healthz HTTP/1\r\n" + HOST + b"\r\n",
    b"GET /healthz http/1.1\r\n" + HOST + b"\r\n",
    b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
    b"GET /healthz HTTP/1.1\r\n" + HOST + HOST + b"\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"NoColon\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"Bad Name: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"Space : x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-A: 1\r\n folded\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b": empty name\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"Content-Length: 1x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"\x00\x01\x02\x03\r\n\r\n",
    b"\xff\xfe GET /healthz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nincomplete",  # then the client shuts its side
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_requests_are_400_and_closed(raw: bytes) -> None:
    async def body() -> tuple[Response, bool, Response, int]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(raw)
            writer.write_eof()
            answer = await read_response(reader)
            gone = await closed(reader)
            writer.close()
            return answer, gone, await request(server, get("/healthz")), server.stats.bad_requests

    answer, gone, health, bad = run(body)
    assert answer.status == 400
    assert gone
    assert health.status == 200
    assert bad == 1


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /healthz HTTP/2.0\r\n" + HOST + b"\r\n", 505),
    (b"GET /healthz HTTP/0.9\r\n" + HOST + b"\r\n", 505),
    (b"GET /healthz HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
])
def test_unsupported_versions_and_codings_have_their_status(raw: bytes, status: int) -> None:
    async def body() -> tuple[Response, bool]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(raw)
            answer = await read_response(reader)
            gone = await closed(reader)
            writer.close()
            return answer, gone

    answer, gone = run(body)
    assert answer.status == status
    assert gone


def test_a_small_request_body_is_skipped_and_the_connection_kept() -> None:
    async def body() -> tuple[Response, Response]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(get("/healthz", extra=b"Content-Length: 5\r\n") + b"hello" +
                         get("/readyz"))
            answers = await read_response(reader), await read_response(reader)
            writer.close()
            return answers

    first, second = run(body)
    assert (first.status, first.body, second.status, second.body) == (200, b"ok\n", 200, b"ok\n")


def test_empty_lines_before_a_request_are_skipped() -> None:
    async def body() -> Response:
        async with running() as server:
            return await request(server, b"\r\n\r\n" + get("/healthz"))

    assert run(body).status == 200


def test_bare_lf_line_ends_are_accepted() -> None:
    async def body() -> Response:
        async with running() as server:
            return await request(server, b"GET /healthz HTTP/1.1\nHost: x\n\n")

    assert run(body).status == 200


# --- size limits ---

@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 50)
                                                   for i in range(200)) + b"\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\n" + HOST + b"Content-Length: 100000\r\n\r\n", 413),
    (b"\r\n" * 5000 + b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n", 400),
])
def test_oversized_requests_are_refused_and_closed(raw: bytes, status: int) -> None:
    async def body() -> tuple[Response, bool, Response]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(raw)
            answer = await read_response(reader)
            gone = await closed(reader)
            writer.close()
            return answer, gone, await request(server, get("/healthz"))

    answer, gone, health = run(body)
    assert answer.status == status
    assert gone
    assert health.status == 200


def test_a_head_just_under_the_limit_is_served() -> None:
    raw = get("/healthz")
    filler = b"X-Fill: " + b"f" * (8192 - len(raw) - len(b"X-Fill: \r\n")) + b"\r\n"
    raw = raw[:-2] + filler + b"\r\n"
    assert len(raw) == 8192

    async def body() -> Response:
        async with running() as server:
            return await request(server, raw)

    assert run(body).status == 200


# --- slow and idle clients ---

FAST = ServerLimits(head_timeout_s=1.0, idle_timeout_s=1.0)


@pytest.mark.parametrize("partial", [b"", b"GET /healthz HTTP/1.1\r\n", b"GET /heal",
                                     b"GET /healthz HTTP/1.1\r\n" + HOST])
def test_a_client_that_never_finishes_its_head_times_out_others_are_served(
    partial: bytes,
) -> None:
    async def body() -> tuple[Response, Response, bool]:
        async with running(FAST) as server:
            slow_reader, slow_writer = await connect(server)
            slow_writer.write(partial)
            meanwhile = await request(server, get("/healthz"))
            answer = await read_response(slow_reader)
            gone = await closed(slow_reader)
            slow_writer.close()
            return meanwhile, answer, gone

    meanwhile, answer, gone = run(body)
    assert meanwhile.status == 200
    assert answer.status == 408
    assert gone


def test_a_client_trickling_its_head_is_cut_off_by_the_head_timeout() -> None:
    async def body() -> tuple[bool, int]:
        async with running(ServerLimits(head_timeout_s=1.0, idle_timeout_s=600)) as server:
            reader, writer = await connect(server)
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            sent = 0
            try:
                async with asyncio.timeout(DEADLINE_S):
                    while not reader.at_eof() and sent < 10_000:
                        writer.write(b"X: y\r\n")  # well under the size limit per second
                        await writer.drain()
                        sent += 1
                        await asyncio.sleep(0.05)
                        if reader._buffer:  # type: ignore[attr-defined]  # the 408 arrived
                            break
            except ConnectionError:
                pass
            answer = await read_response(reader)
            writer.close()
            return answer.status == 408, sent

    got_408, sent = run(body)
    assert got_408
    assert sent < 10_000


def test_an_idle_kept_alive_connection_is_closed_without_an_answer() -> None:
    async def body() -> tuple[Response, bool]:
        async with running(ServerLimits(head_timeout_s=600, idle_timeout_s=0.5)) as server:
            reader, writer = await connect(server)
            writer.write(get("/healthz"))
            answer = await read_response(reader)
            gone = await closed(reader)  # EOF with no bytes: no 408 between requests
            writer.close()
            return answer, gone

    answer, gone = run(body)
    assert answer.status == 200
    assert gone


def test_a_client_that_does_not_read_its_answer_is_dropped_after_the_write_timeout() -> None:
    # A page far larger than the socket buffers: the server's drain() must give up.
    sinks = {f"sink-{i:05d}": SinkStats(records_in=i) for i in range(6000)}
    limits = ServerLimits(write_timeout_s=1.0)

    async def body() -> tuple[int, Response]:
        async with running(limits, snapshot=lambda: Snapshot(sinks=sinks)) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            await asyncio.get_running_loop().sock_sendall(sock, get("/metrics"))
            async with asyncio.timeout(DEADLINE_S):
                while server.stats.timeouts == 0:
                    await asyncio.sleep(0.05)
            sock.close()
            return server.stats.timeouts, await request(server, get("/healthz"))

    timeouts, health = run(body)
    assert timeouts == 1
    assert health.status == 200


# --- keep-alive and Connection ---

def test_two_requests_on_one_kept_alive_connection() -> None:
    async def body() -> list[Response]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(get("/healthz"))
            first = await read_response(reader)
            writer.write(get("/metrics"))
            second = await read_response(reader)
            writer.write(get("/readyz", extra=b"Connection: close\r\n"))
            third = await read_response(reader)
            assert await closed(reader)
            writer.close()
            return [first, second, third]

    first, second, third = run(body)
    assert [first.status, second.status, third.status] == [200, 200, 200]
    assert "connection" not in first.headers and "connection" not in second.headers
    assert third.headers["connection"] == "close"
    assert b"podtap_lines_total" in second.body


def test_pipelined_requests_are_answered_in_order() -> None:
    async def body() -> list[Response]:
        async with running(readiness=lambda: ["not yet"]) as server:
            reader, writer = await connect(server)
            writer.write(get("/healthz") + get("/readyz") + get("/nope") + get("/healthz"))
            answers = [await read_response(reader) for _ in range(4)]
            writer.close()
            return answers

    assert [a.status for a in run(body)] == [200, 503, 404, 200]


@pytest.mark.parametrize(("connection", "kept"), [
    (b"", False), (b"Connection: keep-alive\r\n", True), (b"Connection: Keep-Alive\r\n", True),
    (b"Connection: close\r\n", False),
])
def test_http10_closes_unless_asked_to_keep_alive(connection: bytes, kept: bool) -> None:
    async def body() -> tuple[Response, Response | None, bool]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(b"GET /healthz HTTP/1.0\r\n" + connection + b"\r\n")
            answer = await read_response(reader)
            second = None
            if kept:
                writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
                second = await read_response(reader)
            gone = await closed(reader)
            writer.close()
            return answer, second, gone

    answer, second, gone = run(body)
    assert answer.status == 200
    assert answer.headers["connection"] == ("keep-alive" if kept else "close")
    if kept:
        assert second is not None and second.status == 200
    assert gone


@pytest.mark.parametrize("value", [b"close", b"Close", b"keep-alive, close", b"close, TE"])
def test_http11_connection_close_in_any_form_closes(value: bytes) -> None:
    async def body() -> tuple[Response, bool]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(get("/healthz", extra=b"Connection: " + value + b"\r\n"))
            answer = await read_response(reader)
            gone = await closed(reader)
            writer.close()
            return answer, gone

    answer, gone = run(body)
    assert answer.headers["connection"] == "close"
    assert gone


# --- closing without destroying the answer ---

UNREAD = b"Z" * 200_000  # far more than the server reads before it answers and closes
CLOSING = [
    (get("/healthz", extra=b"Connection: close\r\n") + get("/metrics"), 200),
    (b"GET /healthz HTTP/1.0\r\n\r\n" + get("/metrics"), 200),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"b" * 9000, 431),
    (get("/healthz", extra=b"Content-Length: 100000\r\n"), 413),
    (b"GET /healthz HTTP/1.1 extra\r\n" + HOST + b"\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\n" + HOST + b"\r\n", 505),
]


@pytest.mark.parametrize(("raw", "status"), CLOSING, ids=[
    "connection-close-then-pipelined", "http10-then-pipelined", "414", "431", "413", "400", "505"])
def test_closing_with_client_bytes_unread_sends_the_answer_then_a_clean_end(
    raw: bytes, status: int
) -> None:
    # Closing a socket with unread bytes makes the kernel send a reset, which can destroy
    # the answer before the client reads it: the server must half-close and drain first.
    async def body() -> tuple[Response, bytes | str, int]:
        async with running() as server:
            reader, writer = await connect(server)
            writer.write(raw + UNREAD)
            answer = await read_response(reader)
            try:
                async with asyncio.timeout(DEADLINE_S):
                    rest: bytes | str = await reader.read()
            except ConnectionResetError:
                rest = "reset"
            writer.close()
            return answer, rest, server.stats.connection_errors

    answer, rest, errors = run(body)
    assert answer.status == status
    assert rest == b""  # an end of stream after the answer, not a reset
    assert errors == 0


def test_a_client_that_keeps_sending_after_its_answer_is_closed_after_the_linger_time() -> None:
    async def body() -> tuple[Response, bytes, bool]:
        limits = ServerLimits(linger_s=0.5)
        async with running(limits) as server:
            reader, writer = await connect(server)
            writer.write(b"GET /healthz HTTP/2.0\r\n" + HOST + b"\r\n")
            answer = await read_response(reader)
            async with asyncio.timeout(DEADLINE_S):
                rest = await reader.read()
                gone = False
                while not gone:  # the server still reads until the linger time is over
                    try:
                        writer.write(b"more")
                        await writer.drain()
                        await asyncio.sleep(0.05)
                    except ConnectionError:
                        gone = True
                    gone = gone or not server._connections
            writer.close()
            return answer, rest, gone

    answer, rest, gone = run(body)
    assert answer.status == 505
    assert rest == b""
    assert gone


def test_a_client_pouring_bytes_after_its_answer_is_cut_off_after_the_linger_bytes() -> None:
    async def body() -> tuple[Response, int]:
        limits = ServerLimits(linger_s=600, linger_bytes=100_000)
        async with running(limits) as server:
            reader, writer = await connect(server)
            writer.write(b"GET /healthz HTTP/2.0\r\n" + HOST + b"\r\n")
            answer = await read_response(reader)
            sent = 0
            async with asyncio.timeout(DEADLINE_S):
                try:
                    while server._connections and sent < 1 << 30:
                        writer.write(b"p" * 65536)
                        await writer.drain()
                        sent += 65536
                except ConnectionError:
                    pass
                while server._connections:
                    await asyncio.sleep(0.01)
            writer.close()
            return answer, sent

    answer, sent = run(body)
    assert answer.status == 505
    assert sent < 1 << 30  # the server stopped reading long before a linger of 600 s


def test_lingering_on_a_socket_the_client_already_reset_is_no_error() -> None:
    # Seen in the image test: urllib read its answer and was gone before the server
    # half-closed, and shutdown(SHUT_WR) raised ENOTCONN out of the connection handler.
    class GoneWriter:
        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    async def body() -> None:
        reader = asyncio.StreamReader()
        reader.feed_eof()
        async with running() as server:
            await server._linger(reader, GoneWriter())  # type: ignore[arg-type]

    run(body)

# --- many connections ---

def test_many_concurrent_connections_are_all_served() -> None:
    n = 50

    async def one(server: TelemetryServer, i: int) -> Response:
        reader, writer = await connect(server)
        await asyncio.sleep(0)
        writer.write(get(PATHS[i % 3]))
        answer = await read_response(reader)
        writer.close()
        return answer

    async def body() -> list[Response]:
        async with running(ServerLimits(max_connections=64)) as server:
            return await asyncio.gather(*(one(server, i) for i in range(n)))

    answers = run(body)
    assert len(answers) == n
    assert all(a.status == 200 for a in answers)


def test_connections_beyond_the_limit_are_closed_and_served_again_once_freed() -> None:
    async def body() -> tuple[bool, int, Response]:
        async with running(ServerLimits(max_connections=4, head_timeout_s=600)) as server:
            held = [await connect(server) for _ in range(4)]
            async with asyncio.timeout(DEADLINE_S):  # all four accepted by the server
                while len(server._connections) < 4:
                    await asyncio.sleep(0.02)
            reader, writer = await connect(server)
            writer.write(get("/healthz"))
            refused = await closed(reader)
            writer.close()
            for _r, w in held:
                w.close()
            async with asyncio.timeout(DEADLINE_S):
                while server._connections:
                    await asyncio.sleep(0.02)
            return refused, server.stats.rejected_connections, await request(
                server, get("/healthz"))

    refused, rejected, health = run(body)
    assert refused
    assert rejected == 1
    assert health.status == 200


def test_a_client_resetting_mid_request_does_not_hurt_the_server() -> None:
    async def body() -> Response:
        async with running() as server:
            for partial in (b"", b"GET /metrics HTTP/1.1\r\n", get("/metrics")):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(partial)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # RST
            return await request(server, get("/healthz"))

    assert run(body).status == 200


# --- lifecycle ---

def test_stop_closes_open_connections() -> None:
    async def body() -> tuple[bool, bool]:
        server = TelemetryServer(TelemetryConfig(address="127.0.0.1", port=0), Snapshot, list)
        await server.start()
        reader, writer = await connect(server)
        writer.write(get("/healthz"))
        await read_response(reader)
        idle_reader, idle_writer = await connect(server)
        async with asyncio.timeout(DEADLINE_S):
            await server.stop()
        gone = await closed(reader), await closed(idle_reader)
        writer.close()
        idle_writer.close()
        return gone

    assert run(body) == (True, True)


def test_listening_is_logged_with_the_port(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="podtap.telemetry")

    async def body() -> int:
        async with running() as server:
            return server.port

    port = run(body)
    records = [r for r in caplog.records if r.getMessage() == "telemetry listening"]
    assert len(records) == 1
    assert records[0].port == port  # type: ignore[attr-defined]
    assert records[0].address == "127.0.0.1"  # type: ignore[attr-defined]


def test_the_agent_imports_neither_aiohttp_web_nor_prometheus_client() -> None:
    code = ("import sys, agent.cli, agent.pipeline, agent.telemetry; "
            "print('aiohttp.web' in sys.modules, 'prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.split() == ["False", "False"]
