"""The HTTP transport every HTTP sink shares: POST a request body, return the answer.

One aiohttp session per sink (keep-alive, at most `max_in_flight` connections and
requests), gzip (`Content-Encoding: gzip`), TLS verified by default (CA file, client
certificate for mTLS, expected server name), auth (basic, bearer, Elasticsearch API
key), extra headers and a request timeout. What the backend answered is the codec's
business; this module only turns "no answer" into a `TransportError` that says why.

Secrets (passwords, tokens, API keys) are read from files or environment variables,
never logged and never put into an exception message: aiohttp exceptions are not
chained (some carry the request headers), and error texts are scrubbed of the secrets.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import socket
import ssl
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from agent.config import AuthConfig, SinkConfig, TlsConfig
from agent.kube.token import TokenFile, url_host
from agent.sinks.base import Response, TransportError

log = logging.getLogger("podtap.sinks")

# Bodies at least this large are compressed in a worker thread (zlib releases the GIL).
# Measured on the 2-core development machine: gzip level 3 costs ~2.7 ms of CPU per MiB of
# Elasticsearch bulk body (level 1: 2.5 ms, level 6: 5.6 ms) and a round trip through the
# default executor ~0.12 ms; at 128 KiB the loop would be blocked ~0.35 ms, about three
# times the cost of the hand-off, so from there on the thread is worth it.
GZIP_THREAD_MIN_BYTES: Final = 128 << 10

_REDACTED: Final = "<redacted>"


def _user_agent() -> str:
    try:
        return f"podtap/{version('podtap')}"
    except PackageNotFoundError:
        return "podtap"


def gzip_bytes(body: bytes, level: int) -> bytes:
    """`body` as one gzip member (what `Content-Encoding: gzip` means)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 16+15: gzip framing
    return compressor.compress(body) + compressor.flush()


# --- secrets ---------------------------------------------------------------------------


class _SecretFile:
    """A secret in a file (a mounted Secret), re-read when the file changes.

    Only a trailing line break is removed: a password may hold spaces."""

    __slots__ = ("_key", "_path", "_stamp", "_value")

    def __init__(self, path: str, key: str) -> None:
        self._path = path
        self._key = key
        self._stamp: tuple[int, ...] | None = None
        self._value = ""

    def current(self) -> str:
        try:
            st = os.stat(self._path)
        except OSError as e:
            raise TransportError(f"cannot read {self._key} {self._path}: {e.strerror}") from None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._value = self._read()
            self._stamp = stamp
        return self._value

    def _read(self) -> str:
        try:
            with open(self._path, encoding="utf-8") as f:
                value = f.read()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise TransportError(f"cannot read {self._key} {self._path}: {why}") from None
        value = value.removesuffix("\n").removesuffix("\r")
        if not value or any(ch in value for ch in "\r\n\0"):
            raise TransportError(f"{self._key} {self._path} is empty or holds line breaks")
        return value


def _env_secret(name: str, key: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(f"{key}: the environment variable {name} is not set or empty")
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"{key}: the environment variable {name} holds line breaks")
    return value


class _Auth:
    """The Authorization header of a sink (basic, bearer or API key), or none."""

    def __init__(self, cfg: AuthConfig) -> None:
        self._header: Callable[[], str] | None = None
        self._secrets: list[Callable[[], tuple[str, ...]]] = []
        if cfg.username:
            self._basic(cfg)
        elif cfg.token_file or cfg.token_env:
            self._token(cfg.token_file, cfg.token_env, "Bearer", "auth.token")
        elif cfg.api_key_file or cfg.api_key_env:
            self._token(cfg.api_key_file, cfg.api_key_env, "ApiKey", "auth.api_key")
        self._check()

    def _basic(self, cfg: AuthConfig) -> None:
        user = cfg.username
        if ":" in user:
            raise ValueError("auth.username must not contain ':' (basic auth)")
        if cfg.password_file:
            secret = _SecretFile(cfg.password_file, "auth.password_file")
            password: Callable[[], str] = secret.current
        elif cfg.password_env:
            fixed = _env_secret(cfg.password_env, "auth.password_env")
            password = lambda: fixed  # noqa: E731
        else:
            raise ValueError("auth.username is set without password_file or password_env")

        def header() -> str:
            pair = f"{user}:{password()}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")

        self._header = header
        self._secrets.append(lambda: (password(), header()))

    def _token(self, path: str, env: str, scheme: str, key: str) -> None:
        if path:
            tokens = TokenFile(path, TransportError)
            self._header = lambda: f"{scheme} {tokens.current()}"
            self._secrets.append(lambda: tokens.seen)
        else:
            fixed = _env_secret(env, f"{key}_env")
            self._header = lambda: f"{scheme} {fixed}"
            self._secrets.append(lambda: (fixed,))

    def _check(self) -> None:
        """Read the secret once now: a missing file is a start-up error naming the key."""
        try:
            self.header()
        except TransportError as e:
            raise ValueError(str(e)) from None

    def header(self) -> str | None:
        return None if self._header is None else self._header()

    def scrub(self, text: str) -> str:
        for seen in self._secrets:
            try:
                values = seen()
            except TransportError:
                continue
            for value in values:
                if value:
                    text = text.replace(value, _REDACTED)
        return text


# --- TLS -------------------------------------------------------------------------------


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client TLS context; ValueError naming the key when a file cannot be used."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file or None)
    except OSError as e:
        raise ValueError(f"tls.ca_file {tls.ca_file}: {e.strerror}") from None
    except ssl.SSLError as e:
        raise ValueError(f"tls.ca_file {tls.ca_file} holds no usable PEM CA: {e.reason}") from None
    if tls.cert_file:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except OSError as e:
            which = "tls.cert_file" if not os.access(tls.cert_file, os.R_OK) else "tls.key_file"
            path = tls.cert_file if which == "tls.cert_file" else tls.key_file
            raise ValueError(f"{which} {path}: {e.strerror or e}") from None
        except ssl.SSLError as e:
            raise ValueError(
                f"tls.cert_file {tls.cert_file} / tls.key_file {tls.key_file}: not a matching "
                f"PEM certificate and private key ({e.reason})"
            ) from None
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- the transport ---------------------------------------------------------------------


class HttpTransport:
    """POSTs request bodies to one URL; implements `agent.sinks.base.Transport`.

    Raises ValueError at construction when a credentials or TLS file named in the
    configuration cannot be read (the message names the key).
    """

    def __init__(
        self,
        cfg: SinkConfig,
        url: str,
        content_type: str,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port][/path], got {url!r}")
        self._url = url
        self._host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
        netloc = f"{url_host(parts.hostname)}:{port}"
        self._display_url = f"{parts.scheme}://{netloc}{parts.path}"  # never the userinfo
        self._origin = f"{parts.scheme}://{netloc}/"
        self._timeout_s = cfg.timeout_s
        self._max_in_flight = cfg.max_in_flight
        self._gzip_level = cfg.gzip_level if cfg.gzip else None
        self._auth = _Auth(cfg.auth)
        self._ssl: ssl.SSLContext | None = None
        self._server_name: str | None = None
        self._client_cert = bool(cfg.tls.cert_file)
        if parts.scheme == "https":
            self._ssl = _ssl_context(cfg.tls)
            self._server_name = cfg.tls.server_name or None
            if cfg.tls.insecure_skip_verify:
                log.warning(
                    "TLS verification of %s is disabled (insecure_skip_verify): anyone on "
                    "the path can read and change what is sent",
                    self._display_url,
                )
        self._headers = {"User-Agent": _user_agent(), "Content-Type": content_type}
        self._headers.update(cfg.headers)
        self._headers.update(extra_headers or {})
        if self._gzip_level is not None:
            self._headers["Content-Encoding"] = "gzip"
        self._slots = asyncio.Semaphore(cfg.max_in_flight)
        # One compression thread per sink (~400 MiB/s of gzip level 3 here), started on
        # first use: not the loop's default executor, whose threads (and their malloc
        # arenas) multiply with concurrent requests.
        self._gzipper: ThreadPoolExecutor | None = None
        self._session: aiohttp.ClientSession | None = None
        # Request bodies that got an answer (any status), as sent: after compression.
        self.bytes_sent = 0

    def __repr__(self) -> str:
        return f"HttpTransport(url={self._display_url!r})"

    @property
    def url(self) -> str:
        """The URL as it may be shown (without any userinfo)."""
        return self._display_url

    async def send(self, body: bytes) -> Response:
        """POST one body; waits for a free slot when `max_in_flight` requests are out."""
        data = body if self._gzip_level is None else await self._compress(body)
        headers = dict(self._headers)
        auth = self._auth_header()
        if auth is not None:
            headers["Authorization"] = auth
        async with self._slots:
            response = await self._request("POST", self._url, self._display_url, data, headers)
        self.bytes_sent += len(data)
        return dataclasses.replace(response, sent_bytes=len(data))

    async def preflight(self) -> str | None:
        """One GET of the URL's origin: None when the server answered (any status), else
        what is wrong (unreachable, certificate not trusted, TLS refused)."""
        headers = {"User-Agent": self._headers["User-Agent"]}
        try:
            await self._request("GET", self._origin, self._origin, None, headers)
        except TransportError as e:
            return str(e)
        return None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        gzipper, self._gzipper = self._gzipper, None
        if gzipper is not None:
            gzipper.shutdown(wait=False)

    # -- internals

    def _auth_header(self) -> str | None:
        try:
            return self._auth.header()
        except TransportError as e:
            raise TransportError(f"{self._display_url}: {e}") from None

    async def _compress(self, body: bytes) -> bytes:
        assert self._gzip_level is not None
        if len(body) < GZIP_THREAD_MIN_BYTES:
            return gzip_bytes(body, self._gzip_level)
        if self._gzipper is None:
            self._gzipper = ThreadPoolExecutor(1, thread_name_prefix="podtap-gzip")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._gzipper, gzip_bytes, body, self._gzip_level)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl if self._ssl is not None else True,
                limit=self._max_in_flight + 1,  # + the preflight
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                trust_env=False,  # credentials never go through an unconfigured proxy
                auto_decompress=True,
            )
        return self._session

    async def _request(
        self, method: str, url: str, shown: str, data: bytes | None, headers: dict[str, str]
    ) -> Response:
        session = self._get_session()
        try:
            async with session.request(
                method,
                url,
                data=data,
                headers=headers,
                allow_redirects=False,
                server_hostname=self._server_name,
            ) as resp:
                payload = await resp.read()
                names = {k.lower(): v for k, v in resp.headers.items()}
                return Response(resp.status, names, payload)
        except TimeoutError:
            raise TransportError(
                f"{method} {shown}: no answer within {self._timeout_s:g}s (timeout_s)"
            ) from None
        except (aiohttp.ClientError, ssl.SSLError, OSError) as e:
            raise TransportError(self._auth.scrub(self._why(f"{method} {shown}", e))) from None

    def _why(self, where: str, e: BaseException) -> str:
        """A clear one-line reason for a request that got no answer."""
        name = self._server_name or self._host
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            cert_error = e.certificate_error
            detail = getattr(cert_error, "verify_message", None) or str(cert_error)
            return f"{where}: certificate verify failed for {name}: {detail}"
        if isinstance(e, aiohttp.ClientConnectorDNSError):
            return f"{where}: cannot resolve {self._host}: {_os_reason(e.os_error)}"
        if isinstance(e, aiohttp.ClientConnectorSSLError):
            return f"{where}: TLS handshake with {name} failed: {_os_reason(e.os_error)}"
        if isinstance(e, aiohttp.ClientConnectorError):
            return f"{where}: cannot connect: {_os_reason(e.os_error)}"
        if isinstance(e, aiohttp.ServerDisconnectedError):
            return f"{where}: the server closed the connection without an answer{self._hint()}"
        if isinstance(e, ssl.SSLError):
            return f"{where}: TLS error with {name}: {e.reason or e}{self._hint()}"
        if isinstance(e, aiohttp.ClientOSError):
            return f"{where}: connection failed: {_os_reason(e)}{self._hint()}"
        return f"{where}: {type(e).__name__}: {e}"


    def _hint(self) -> str:
        """A TLS server that wants a client certificate drops the connection after the
        handshake (TLS 1.3): say so when none is configured."""
        if self._ssl is None or self._client_cert:
            return ""
        return " (if the server requires a client certificate, set tls.cert_file and tls.key_file)"


def _os_reason(e: OSError) -> str:
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e)
    # asyncio words ECONNREFUSED as "Connect call failed (addr)"; getaddrinfo's codes are
    # negative and have their own texts.
    if e.errno and e.errno > 0 and not isinstance(e, socket.gaierror):
        return os.strerror(e.errno)
    return e.strerror or str(e) or type(e).__name__
