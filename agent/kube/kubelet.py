"""Async client of the kubelet's authenticated HTTPS API (`GET /pods` on port 10250).

The kubelet answers `/pods` with a `v1.PodList` of the pods bound to its node. Access is
authenticated with the agent's service-account bearer token (checked by the kubelet with a
TokenReview) and authorized with a SubjectAccessReview for `get` on `nodes/pods` (clusters
>= 1.33, KubeletFineGrainedAuthz) falling back to `nodes/proxy`.

The token is never logged and never put in an exception message or repr: error texts that
could echo it (bodies, aiohttp messages) are scrubbed, and aiohttp exceptions are not chained
because some of them carry the request headers in their repr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson

from agent.kube.token import TokenFile, url_host

if TYPE_CHECKING:
    from agent.config import KubeConfig

log = logging.getLogger("podtap.kube")

SA_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TOKEN_PATH: Final = f"{SA_DIR}/token"
DEFAULT_CA_PATH: Final = f"{SA_DIR}/ca.crt"
KUBELET_PORT: Final = 10250
PODS_PATH: Final = "/pods"

_EXCERPT_CHARS: Final = 200
_REDACTED: Final = "<redacted>"


class KubeletError(Exception):
    """The kubelet could not be reached or gave an unusable answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeletAuthError(KubeletError):
    """The kubelet refused the agent's credentials (HTTP 401) or its permissions (HTTP 403)."""


@dataclass(frozen=True, slots=True)
class KubeletConfig:
    """Where the kubelet is and how to talk to it. Holds paths, never the token itself."""

    url: str
    token_path: str | None
    ca_path: str | None
    insecure_skip_verify: bool = False
    timeout_s: float = 5.0
    retries: int = 3
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        malformed = (
            parts.scheme != "https"
            or not parts.hostname
            or self.url != self.url.strip()
            or bool(parts.query or parts.fragment)
        )
        try:
            _ = parts.port  # a port that is not a number in 0..65535 raises
        except ValueError:
            malformed = True
        if malformed:
            raise ValueError(f"kubelet url must be https://host[:port][/path], got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")

    @classmethod
    def from_section(cls, kube: KubeConfig, env: Mapping[str, str] | None = None) -> KubeletConfig:
        """From the `kube` configuration section: `kubelet_url`, or in-cluster
        (`https://$NODE_IP:10250`), with its credentials, TLS and retry settings."""
        url = kube.kubelet_url or cls.in_cluster(env).url
        return cls(
            url=url,
            token_path=kube.token_path,
            ca_path=kube.ca_path,
            insecure_skip_verify=kube.insecure_skip_verify,
            timeout_s=kube.timeout_s,
            retries=kube.retries,
        )

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str] | None = None, *, port: int = KUBELET_PORT
    ) -> KubeletConfig:
        """Config of an agent pod: kubelet at `https://$NODE_IP:10250`, service-account creds.

        NODE_IP comes from the downward API (`fieldRef: status.hostIP`).
        """
        node_ip = (os.environ if env is None else env).get("NODE_IP", "").strip()
        if not node_ip:
            raise KubeletError(
                "NODE_IP is not set: give the agent container an env var NODE_IP "
                "from the downward API (valueFrom.fieldRef.fieldPath: status.hostIP)"
            )
        return cls(
            url=f"https://{url_host(node_ip)}:{port}",
            token_path=DEFAULT_TOKEN_PATH,
            ca_path=DEFAULT_CA_PATH,
        )


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    retry_after: str | None
    body: bytes


class _TransientError(Exception):
    """A failure worth retrying (connection trouble, timeout); message already scrubbed."""


class KubeletClient:
    """Fetches the kubelet's PodList. One client per agent; reuses its HTTPS connections."""

    def __init__(self, config: KubeletConfig) -> None:
        self._config = config
        self._pods_url = config.url.rstrip("/") + PODS_PATH
        self._token = TokenFile(config.token_path, KubeletError) if config.token_path else None
        self._session: aiohttp.ClientSession | None = None
        self._random = random.Random()
        if config.insecure_skip_verify:
            log.warning(
                "TLS verification of the kubelet at %s is disabled (insecure_skip_verify): "
                "the agent cannot tell the real kubelet from an impostor",
                config.url,
            )

    def __repr__(self) -> str:
        return f"KubeletClient(url={self._config.url!r})"

    @property
    def config(self) -> KubeletConfig:
        return self._config

    async def __aenter__(self) -> KubeletClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def get_pods(self) -> list[dict[str, Any]]:
        """The `items` of the kubelet's PodList, as sent (entries are not validated here).

        Raises KubeletAuthError on 401/403 and KubeletError on any other failure.
        """
        body = await self._fetch_with_retries()
        return _pod_list_items(body, self._pods_url)

    async def _fetch_with_retries(self) -> bytes:
        attempts = self._config.retries + 1
        failures = 0
        token_reloaded = False
        while True:
            answer, failure = await self._attempt()
            if answer is not None:
                if answer.status == 200:
                    return answer.body
                if answer.status == 401 and self._token is not None and not token_reloaded:
                    token_reloaded = True  # the token may have rotated unnoticed: re-read once
                    self._token.reload()
                    continue
                self._raise_if_final(answer)
            failures += 1
            if failures >= attempts:
                raise KubeletError(
                    f"GET {self._pods_url} failed after {failures} attempt(s): {failure}",
                    status=answer.status if answer is not None else None,
                )
            delay = self._backoff_delay(failures, answer.retry_after if answer else None)
            log.info(
                "GET %s attempt %d/%d failed (%s); retrying in %.2fs",
                self._pods_url,
                failures,
                attempts,
                failure,
                delay,
            )
            await asyncio.sleep(delay)

    async def _attempt(self) -> tuple[_Answer | None, str]:
        """One request: its answer, or None and why it failed in a retryable way."""
        try:
            answer = await self._request_once()
        except _TransientError as exc:
            return None, str(exc)
        return answer, f"HTTP {answer.status}: {self._excerpt(answer.body)}"

    def _raise_if_final(self, answer: _Answer) -> None:
        """Raise for answers that retrying cannot fix: auth errors and 4xx other than 429."""
        status = answer.status
        if status in (401, 403):
            raise KubeletAuthError(self._auth_error_message(answer), status=status)
        if status == 429 or status >= 500:
            return
        raise KubeletError(
            f"GET {self._pods_url} answered HTTP {status}: {self._excerpt(answer.body)}",
            status=status,
        )

    def _auth_error_message(self, answer: _Answer) -> str:
        what = (
            "rejected the agent's token (401 Unauthorized: the token is missing, expired, or "
            "the kubelet cannot validate it with a TokenReview)"
            if answer.status == 401
            else "denied access (403 Forbidden)"
        )
        return (
            f"kubelet at {self._config.url} {what}. The agent's service account needs an RBAC "
            'ClusterRole rule: apiGroups [""], resources ["nodes/pods"], verbs ["get"] '
            '(on clusters older than 1.33, or with KubeletFineGrainedAuthz off: "nodes/proxy"), '
            f"bound to it with a ClusterRoleBinding. Kubelet said: {self._excerpt(answer.body)}"
        )

    async def _request_once(self) -> _Answer:
        session = self._get_session()
        headers = {"Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.current()}"
        try:
            async with session.get(self._pods_url, headers=headers, allow_redirects=False) as resp:
                body = await resp.read()
                return _Answer(resp.status, resp.headers.get("Retry-After"), body)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise KubeletError(self._tls_failure_message(exc)) from None
        except TimeoutError:
            raise _TransientError(f"no answer within {self._config.timeout_s}s") from None
        except aiohttp.ClientError as exc:
            raise _TransientError(f"{type(exc).__name__}: {self._scrub(str(exc))}") from None

    def _tls_failure_message(self, exc: aiohttp.ClientConnectorCertificateError) -> str:
        trust = self._config.ca_path or "the system trust store"
        return (
            f"TLS verification of the kubelet at {self._config.url} failed "
            f"({self._scrub(str(exc.certificate_error))}). Its serving certificate must be "
            f"signed by a CA in {trust} and name the node IP in its subjectAltName (kubelet "
            "serverTLSBootstrap: true with approved CSRs); insecure_skip_verify disables the "
            "check at the cost of trusting any server at that address"
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl_setting())
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_s),
                headers={"User-Agent": "podtap"},
                trust_env=False,  # never route the kubelet (and its token) through a proxy
            )
        return self._session

    def _ssl_setting(self) -> ssl.SSLContext | bool:
        if self._config.insecure_skip_verify:
            return False
        try:
            return ssl.create_default_context(cafile=self._config.ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise KubeletError(
                f"cannot load the kubelet CA bundle {self._config.ca_path}: {exc}"
            ) from None

    def _backoff_delay(self, failures: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter in [d/2, d]; a numeric Retry-After wins, capped."""
        cap = self._config.backoff_max_s
        if retry_after is not None and retry_after.strip().isdigit():
            return min(float(retry_after.strip()), cap)
        delay = min(cap, self._config.backoff_initial_s * 2 ** (failures - 1))
        return self._random.uniform(delay / 2, delay)

    def _excerpt(self, body: bytes) -> str:
        return _body_excerpt(body, self._scrub)

    def _scrub(self, text: str) -> str:
        if self._token is None:
            return text
        for secret in self._token.seen:
            text = text.replace(secret, _REDACTED)
        return text


def _body_excerpt(body: bytes, scrub: Callable[[str], str]) -> str:
    """The start of a body as one printable line, secrets removed, for error messages."""
    text = body[: _EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    text = scrub(" ".join(text.split()))
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if not text:
        return "(empty body)"
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


def _pod_list_items(body: bytes, url: str) -> list[dict[str, Any]]:
    """The `items` of a v1.PodList body; KubeletError if it is not one.

    The kubelet encodes an empty list as `"items": null` (a nil Go slice), read as [].
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise KubeletError(f"GET {url} returned malformed JSON ({exc})", status=200) from None
    if not isinstance(doc, dict):
        raise KubeletError(
            f"GET {url} returned a JSON {type(doc).__name__}, not a PodList object", status=200
        )
    kind = doc.get("kind")
    if kind is not None and kind != "PodList":
        raise KubeletError(f"GET {url} returned kind {str(kind)[:40]!r}, not PodList", status=200)
    if "items" not in doc:
        raise KubeletError(
            f"GET {url} returned an object without 'items': not a PodList", status=200
        )
    items = doc["items"]
    if items is None:
        return []
    if not isinstance(items, list):
        raise KubeletError(
            f"GET {url} returned 'items' of type {type(items).__name__}, not a list: not a PodList",
            status=200,
        )
    return items
