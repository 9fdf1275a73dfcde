"""The plumbing the loopback HTTPS test doubles share (FakeKubelet, FakeApiServer).

A `LoopbackHttpsServer` serves one aiohttp catch-all route (`_handle`) on 127.0.0.1 with an
ephemeral port, over TLS, from its own event loop on a daemon thread, so the same object
serves synchronous tests, asyncio tests (whose loop it never blocks for long) and the demo.
A subclass names itself (`_display_name`, `_thread_name`, `_tls_name`), answers requests
(`_handle`) and may start down (`_starts_down`) or tidy up before stopping (`_before_stop`).
Closing the listener and listening again (`_close_listener`, `_listen`) keeps the port.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, ClassVar, Self

from aiohttp import web

from simnode.tls import TLSFiles, generate_tls


class LoopbackHttpsServer(ABC):
    """HTTPS on 127.0.0.1 from a thread of its own; a subclass answers the requests."""

    _display_name: ClassVar[str]  # in error messages: "<name> already started"
    _thread_name: ClassVar[str]  # the server thread's name
    _tls_name: ClassVar[str | None] = None  # generate_tls(name=...); None: its default

    def __init__(self, *, token: str | None, tls: TLSFiles | None) -> None:
        self._lock = threading.Lock()
        self._token = token
        self._owns_tls = tls is None
        self._tls = tls
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- hooks

    def _starts_down(self) -> bool:
        """True: `start()` runs the loop but does not listen (the double is "down")."""
        return False

    def _before_stop(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Called by `stop()` first, while the loop still runs."""

    @abstractmethod
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Answer any request (every method, every path)."""

    # -- lifecycle

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{self._display_name} already started")
        if self._tls is None:
            self._tls = (
                generate_tls() if self._tls_name is None else generate_tls(name=self._tls_name)
            )
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=self._thread_name, daemon=True
        )
        self._thread.start()
        try:
            if not self._starts_down():
                self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._before_stop()
            self._call(self._close_listener())
            self._call(_cancel_other_tasks())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = None
            if self._owns_tls and self._tls is not None:
                shutil.rmtree(self._tls.directory, ignore_errors=True)
                self._tls = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it is

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port}"

    @property
    def tls(self) -> TLSFiles:
        if self._tls is None:
            raise RuntimeError(f"{self._display_name} not started")
        return self._tls

    @property
    def ca_path(self) -> str:
        return str(self.tls.ca_cert)

    @property
    def token(self) -> str | None:
        """The bearer token it accepts (None: accept any request, as with anonymous auth)."""
        with self._lock:
            return self._token

    @token.setter
    def token(self, value: str | None) -> None:
        with self._lock:
            self._token = value

    # -- server internals (run on the server's thread)

    def _call(self, coro: Coroutine[Any, Any, None], timeout: float = 15.0) -> None:
        """Run `coro` on the server's loop and wait for it (never call from that loop)."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(
            runner, "127.0.0.1", self._port, ssl_context=self._server_ssl(), reuse_address=True
        )
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def _close_listener(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _server_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.tls.server_cert), str(self.tls.server_key))
        return ctx


async def _cancel_other_tasks() -> None:
    """Cancel what is still running on the server loop (slow handlers) and let it unwind."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def bearer_matches(header: str | None, expected: str | None) -> bool:
    """The Authorization header carries this bearer token (None: anything is accepted)."""
    if expected is None:
        return True
    if header is None:
        return False
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and value.strip() == expected
