"""HttpTransport against loopback HTTP(S) servers: gzip, TLS, mTLS, auth, limits, errors."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AuthConfig, SinkConfig, TlsConfig
from agent.sinks.base import Response, TransportError
from agent.sinks.http import GZIP_THREAD_MIN_BYTES, HttpTransport
from simnode.esbulk import Answer, RecordingServer
from simnode.tls import TLSFiles, generate_tls

BODY = b"".join(b'{"message":"line %d of a log","stream":"stdout"}\n' % i for i in range(500))


def cfg(url: str, **kw: Any) -> SinkConfig:
    kw.setdefault("timeout_s", 20.0)
    return SinkConfig(kind="http", url=url, **kw)


def send(c: SinkConfig, body: bytes = BODY, url: str | None = None,
         content_type: str = "application/x-ndjson",
         extra: dict[str, str] | None = None) -> Response:
    async def main() -> Response:
        t = HttpTransport(c, url or c.url, content_type, extra)
        try:
            return await t.send(body)
        finally:
            await t.close()

    return asyncio.run(main())


def send_error(c: SinkConfig) -> str:
    with pytest.raises(TransportError) as info:
        send(c)
    return str(info.value)


def preflight(c: SinkConfig) -> str | None:
    async def main() -> str | None:
        t = HttpTransport(c, c.url, "application/json")
        try:
            return await t.preflight()
        finally:
            await t.close()

    return asyncio.run(main())


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return generate_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return generate_tls(tmp_path_factory.mktemp("other"), name="other")


def make_client_cert(tls: TLSFiles, out: Path) -> tuple[Path, Path]:
    """A client certificate (extendedKeyUsage clientAuth) signed by the test CA."""
    key, csr, crt, ext = (out / n for n in ("client.key", "client.csr", "client.crt", "c.ext"))
    ext.write_text("basicConstraints = critical, CA:FALSE\nextendedKeyUsage = clientAuth\n")

    def run(*argv: str | Path) -> None:
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True,
                       timeout=30)

    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    run("req", "-new", "-key", key, "-subj", "/CN=podtap-client", "-out", csr)
    run("x509", "-req", "-in", csr, "-CA", tls.ca_cert, "-CAkey", tls.ca_key,
        "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", crt)
    return crt, key


@pytest.fixture
def http_server() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


@pytest.fixture
def https_server(tls_files: TLSFiles) -> Iterator[RecordingServer]:
    with RecordingServer(https=True, tls=tls_files) as server:
        yield server


# --- bodies and headers -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 64 << 10, GZIP_THREAD_MIN_BYTES, 3 << 20])
def test_gzip_on_sends_a_gzip_member_the_server_decodes(
    http_server: RecordingServer, size: int
) -> None:
    body = (BODY * (size // len(BODY) + 1))[:size]
    resp = send(cfg(http_server.url), body)
    assert resp.status == 200
    (got,) = http_server.requests()
    assert got.headers["content-encoding"] == "gzip"
    assert got.body == body  # decoded by the test, not by aiohttp
    if size >= 64 << 10:
        assert len(got.raw) < len(body) / 4


def test_gzip_off_sends_the_body_as_is(http_server: RecordingServer) -> None:
    send(cfg(http_server.url, gzip=False))
    (got,) = http_server.requests()
    assert "content-encoding" not in got.headers
    assert got.raw == BODY
    assert got.headers["content-length"] == str(len(BODY))


def test_gzip_level_is_used(http_server: RecordingServer) -> None:
    body = BODY * 40
    send(cfg(http_server.url, gzip_level=1), body)
    send(cfg(http_server.url, gzip_level=9), body)
    fast, best = http_server.requests()
    assert fast.body == best.body == body
    assert len(best.raw) < len(fast.raw)


def test_answer_is_returned_with_lower_case_headers(http_server: RecordingServer) -> None:
    http_server.answer(Answer(503, b'{"busy":1}', {"Retry-After": "7", "X-Thing": "a"}))
    resp = send(cfg(http_server.url))
    assert resp.status == 503
    assert resp.body == b'{"busy":1}'
    assert resp.headers["retry-after"] == "7"
    assert resp.headers["x-thing"] == "a"
    assert all(name == name.lower() for name in resp.headers)


def test_content_type_config_and_codec_headers_are_sent(http_server: RecordingServer) -> None:
    c = cfg(http_server.url + "/ingest?x=1", headers={"X-Team": "logs"})
    send(c, content_type="application/json", extra={"X-Scope-OrgID": "tenant-a"})
    (got,) = http_server.requests()
    assert got.method == "POST"
    assert got.path == "/ingest" and got.query == {"x": "1"}
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-team"] == "logs"
    assert got.headers["x-scope-orgid"] == "tenant-a"
    assert got.headers["user-agent"].startswith("podtap")
    assert "authorization" not in got.headers


def test_one_keep_alive_connection_for_sequential_requests(http_server: RecordingServer) -> None:
    async def main() -> None:
        t = HttpTransport(cfg(http_server.url), http_server.url, "application/x-ndjson")
        try:
            for _ in range(5):
                assert (await t.send(b"x\n")).status == 200
        finally:
            await t.close()

    asyncio.run(main())
    assert len(http_server.requests()) == 5
    assert http_server.connections == 1


def test_bytes_sent_counts_bodies_as_sent(http_server: RecordingServer) -> None:
    async def main(gzip: bool) -> int:
        t = HttpTransport(cfg(http_server.url, gzip=gzip), http_server.url, "x/y")
        try:
            first = await t.send(BODY)
            second = await t.send(BODY)
            assert first.sent_bytes + second.sent_bytes == t.bytes_sent
            return t.bytes_sent
        finally:
            await t.close()

    assert asyncio.run(main(False)) == 2 * len(BODY)
    compressed = asyncio.run(main(True))
    assert compressed == sum(len(r.raw) for r in http_server.requests()[2:])
    assert compressed < len(BODY)


# --- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_max_in_flight_requests(http_server: RecordingServer, limit: int) -> None:
    http_server.default = Answer(delay_s=0.3)

    async def main() -> list[int]:
        t = HttpTransport(cfg(http_server.url, max_in_flight=limit), http_server.url, "x/y")
        try:
            answers = await asyncio.gather(*(t.send(b"%d" % i) for i in range(3 * limit + 2)))
            return [a.status for a in answers]
        finally:
            await t.close()

    assert asyncio.run(main()) == [200] * (3 * limit + 2)
    assert http_server.max_in_flight == limit


def test_no_answer_within_timeout_is_a_transport_error(http_server: RecordingServer) -> None:
    http_server.default = Answer(delay_s=60)
    started = time.monotonic()
    try:
        text = send_error(cfg(http_server.url, timeout_s=0.5))
    finally:
        http_server.release.set()
    assert "no answer within 0.5s" in text
    assert http_server.url in text
    assert time.monotonic() - started < 30


def test_connection_refused_is_a_transport_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/_bulk"
    text = send_error(cfg(url))
    assert "cannot connect" in text and "refused" in text.lower()
    assert preflight(cfg(url)) == text.replace("POST", "GET").replace("/_bulk", "/")


def test_unknown_host_is_a_transport_error() -> None:
    text = send_error(cfg("http://podtap-no-such-host.invalid:9200/"))
    assert "cannot resolve podtap-no-such-host.invalid: " in text
    assert "Unknown error" not in text


def test_server_closing_without_answer_is_a_transport_error() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def close_one() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    import threading

    closer = threading.Thread(target=close_one, daemon=True)
    closer.start()
    try:
        text = send_error(cfg(f"http://127.0.0.1:{port}/", gzip=False))
    finally:
        listener.close()
    assert "closed the connection" in text or "connection failed" in text


# --- TLS -----------------------------------------------------------------------------------


def test_tls_verified_with_the_configured_ca(https_server: RecordingServer,
                                             tls_files: TLSFiles) -> None:
    c = cfg(https_server.url, tls=TlsConfig(ca_file=str(tls_files.ca_cert)))
    assert send(c).status == 200
    assert preflight(c) is None


def test_tls_untrusted_certificate_fails_with_a_clear_message(
    https_server: RecordingServer, other_ca: TLSFiles
) -> None:
    for tls in (TlsConfig(ca_file=str(other_ca.ca_cert)), TlsConfig()):  # other CA, system CAs
        c = cfg(https_server.url, tls=tls)
        text = send_error(c)
        assert "certificate verify failed for 127.0.0.1" in text
        assert "certificate" in (preflight(c) or "")
    assert https_server.requests() == []


def test_tls_server_name_is_checked(https_server: RecordingServer, tls_files: TLSFiles) -> None:
    ca = str(tls_files.ca_cert)
    ok = cfg(https_server.url, tls=TlsConfig(ca_file=ca, server_name="localhost"))
    assert send(ok).status == 200
    wrong = cfg(https_server.url, tls=TlsConfig(ca_file=ca, server_name="es.example.com"))
    text = send_error(wrong)
    assert "certificate verify failed for es.example.com" in text
    assert "mismatch" in text.lower() or "es.example.com" in text


def test_insecure_skip_verify_accepts_any_certificate_and_warns_once(
    https_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    c = cfg(https_server.url, tls=TlsConfig(insecure_skip_verify=True))
    with caplog.at_level(logging.WARNING, logger="podtap.sinks"):

        async def main() -> None:
            t = HttpTransport(c, c.url, "application/json")
            try:
                for _ in range(3):
                    assert (await t.send(b"{}")).status == 200
            finally:
                await t.close()

        asyncio.run(main())
    warnings = [r for r in caplog.records if "insecure_skip_verify" in r.getMessage()]
    assert len(warnings) == 1


def test_mtls_client_certificate(tls_files: TLSFiles, tmp_path: Path) -> None:
    crt, key = make_client_cert(tls_files, tmp_path)
    ca = str(tls_files.ca_cert)
    with RecordingServer(https=True, tls=tls_files, client_ca=ca) as server:
        with_cert = cfg(server.url, tls=TlsConfig(ca_file=ca, cert_file=str(crt),
                                                  key_file=str(key)))
        assert send(with_cert).status == 200
        without = cfg(server.url, tls=TlsConfig(ca_file=ca))
        text = send_error(without)
        assert server.url in text and "tls.cert_file" in text
        assert len(server.requests()) == 1


@pytest.mark.parametrize("which", ["ca_file", "cert_file", "key_file"])
def test_missing_tls_file_is_an_error_naming_the_key(
    tls_files: TLSFiles, tmp_path: Path, which: str
) -> None:
    crt, key = make_client_cert(tls_files, tmp_path)
    files = {"ca_file": str(tls_files.ca_cert), "cert_file": str(crt), "key_file": str(key)}
    files[which] = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match=f"tls.{which}"):
        HttpTransport(cfg("https://127.0.0.1:1/", tls=TlsConfig(**files)), "https://127.0.0.1:1/",
                      "application/json")


def test_ca_file_without_a_certificate_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="tls.ca_file"):
        HttpTransport(cfg("https://127.0.0.1:1/", tls=TlsConfig(ca_file=str(bad))),
                      "https://127.0.0.1:1/", "application/json")


# --- auth ----------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_from_a_file_and_from_the_environment(
    http_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pw = tmp_path / "password"
    pw.write_text("s3cret with spaces\n")
    send(cfg(http_server.url, auth=AuthConfig(username="elastic", password_file=str(pw))))
    monkeypatch.setenv("PODTAP_TEST_PW", "äö-pass")
    send(cfg(http_server.url, auth=AuthConfig(username="u", password_env="PODTAP_TEST_PW")))
    first, second = http_server.requests()
    assert first.headers["authorization"] == basic("elastic", "s3cret with spaces")
    assert second.headers["authorization"] == basic("u", "äö-pass")


def test_bearer_token_and_api_key(http_server: RecordingServer, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PODTAP_TEST_TOKEN", "tok-123")
    send(cfg(http_server.url, auth=AuthConfig(token_env="PODTAP_TEST_TOKEN")))
    key = tmp_path / "api_key"
    key.write_text("VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==\n")
    send(cfg(http_server.url, auth=AuthConfig(api_key_file=str(key))))
    monkeypatch.setenv("PODTAP_TEST_KEY", "a2V5")
    send(cfg(http_server.url, auth=AuthConfig(api_key_env="PODTAP_TEST_KEY")))
    got = [r.headers["authorization"] for r in http_server.requests()]
    assert got == [
        "Bearer tok-123",
        "ApiKey VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==",
        "ApiKey a2V5",
    ]


@pytest.mark.parametrize("replace", ["rewrite", "rename"])
def test_bearer_token_file_is_reread_when_it_rotates(
    http_server: RecordingServer, tmp_path: Path, replace: str
) -> None:
    token = tmp_path / "token"
    token.write_text("first-token")
    c = cfg(http_server.url, auth=AuthConfig(token_file=str(token)))

    async def main() -> None:
        t = HttpTransport(c, c.url, "application/json")
        try:
            await t.send(b"{}")
            await t.send(b"{}")
            if replace == "rewrite":  # same inode, new content and mtime
                token.write_text("second-token-longer")
                os.utime(token, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
            else:  # what the kubelet does: a new file swapped in
                new = tmp_path / "token.new"
                new.write_text("second-token-longer")
                os.replace(new, token)
            await t.send(b"{}")
        finally:
            await t.close()

    asyncio.run(main())
    got = [r.headers["authorization"] for r in http_server.requests()]
    assert got == ["Bearer first-token"] * 2 + ["Bearer second-token-longer"]


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        (AuthConfig(username="u", password_file="/nonexistent/pw"), "auth.password_file"),
        (AuthConfig(username="u", password_env="PODTAP_TEST_UNSET"), "auth.password_env"),
        (AuthConfig(token_file="/nonexistent/token"), "token file /nonexistent/token"),
        (AuthConfig(token_env="PODTAP_TEST_UNSET"), "auth.token_env"),
        (AuthConfig(api_key_file="/nonexistent/key"), "/nonexistent/key"),
        (AuthConfig(api_key_env="PODTAP_TEST_UNSET"), "auth.api_key_env"),
    ],
)
def test_missing_credentials_are_an_error_at_construction(
    auth: AuthConfig, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PODTAP_TEST_UNSET", raising=False)
    with pytest.raises(ValueError, match=key):
        HttpTransport(cfg("http://127.0.0.1:1/", auth=auth), "http://127.0.0.1:1/", "x/y")


def test_credentials_never_appear_in_errors(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("super-secret-token")
    pw = tmp_path / "pw"
    pw.write_text("super-secret-pw")
    url = f"http://127.0.0.1:{free_port()}/"
    for auth in (AuthConfig(token_file=str(token)),
                 AuthConfig(username="u", password_file=str(pw))):
        c = cfg(url, auth=auth)

        async def main(c: SinkConfig = c) -> list[str]:
            t = HttpTransport(c, c.url, "x/y")
            texts = []
            try:
                for _ in range(2):
                    try:
                        await t.send(b"x")
                    except TransportError as e:
                        texts.append(str(e) + repr(e) + repr(t))
                token.unlink(missing_ok=True)
                pw.unlink(missing_ok=True)
                try:
                    await t.send(b"x")
                except TransportError as e:
                    texts.append(str(e) + repr(e))
            finally:
                await t.close()
            return texts

        texts = asyncio.run(main())
        assert len(texts) == 3
        for text in texts:
            assert "super-secret" not in text
            assert base64.b64encode(b"u:super-secret-pw").decode() not in text
        token.write_text("super-secret-token")
        pw.write_text("super-secret-pw")


def test_url_userinfo_is_never_shown() -> None:
    url = f"http://user:hunter2@127.0.0.1:{free_port()}/x"
    text = send_error(cfg(url))
    assert "hunter2" not in text
    assert "hunter2" not in repr(HttpTransport(cfg(url), url, "x/y"))


def test_preflight_any_http_answer_is_reachable(http_server: RecordingServer) -> None:
    http_server.default = Answer(404, b"no")
    assert preflight(cfg(http_server.url + "/some/path/_bulk")) is None
    (got,) = http_server.requests()
    assert got.method == "GET" and got.path == "/"
