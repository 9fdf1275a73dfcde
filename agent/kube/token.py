"""The service-account bearer token, shared by the kubelet and API server clients."""

from __future__ import annotations

import ipaddress
import os
import re
import threading

_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what a header can carry


class TokenFile:
    """The bearer token file, re-read whenever its identity (inode, size, mtime) changes.

    Projected service-account tokens rotate (hourly by default): the kubelet swaps a
    symlink, so the inode changes; `os.stat` per request is cheap enough to notice that at
    once.  Thread-safe.  Errors are raised as `error` (the caller's own exception class),
    and never contain the token.
    """

    __slots__ = ("_path", "_error", "_lock", "_token", "_stamp", "_seen")

    def __init__(self, path: str, error: type[Exception]) -> None:
        self._path = path
        self._error = error
        self._lock = threading.Lock()
        self._token: str | None = None
        self._stamp: tuple[int, ...] | None = None
        self._seen: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"TokenFile(path={self._path!r})"

    @property
    def seen(self) -> tuple[str, ...]:
        """The last tokens read (current and previous), for scrubbing error texts."""
        return self._seen

    def current(self) -> str:
        with self._lock:
            stamp = self._stat()
            if self._token is None or stamp != self._stamp:
                self._load(stamp)
            assert self._token is not None
            return self._token

    def reload(self) -> str:
        with self._lock:
            self._load(self._stat())
            assert self._token is not None
            return self._token

    def _stat(self) -> tuple[int, ...]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise self._error(f"cannot read token file {self._path}: {exc.strerror}") from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _load(self, stamp: tuple[int, ...]) -> None:
        try:
            with open(self._path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise self._error(f"cannot read token file {self._path}: {reason}") from None
        if not _TOKEN_CHARS.fullmatch(token):
            raise self._error(
                f"token file {self._path} is empty or holds spaces or control characters"
            )
        if token != self._token:
            self._seen = (token, *self._seen[:1])
        self._token = token
        self._stamp = stamp


def url_host(host: str) -> str:
    """Bracket IPv6 literals for use in a URL."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
