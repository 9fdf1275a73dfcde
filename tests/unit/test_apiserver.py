"""Namespace/node labels from the API server: the real kubernetes client against the
loopback FakeApiServer over real HTTPS (127.0.0.1 only)."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from agent.kube.apiserver import (
    ApiServerConfigError,
    NamespaceLabels,
    in_cluster_url,
    make_core_api,
    node_labels,
)
from simnode.apiserver import NAME_LABEL, SYSTEM_NAMESPACES, FakeApiServer
from simnode.tls import TLSFiles, generate_tls

TOKEN = "eyJhbGciOiJSUzI1NiJ9.apis3rv3r-podtap-token-0123456789"
WRONG = "eyJhbGciOiJSUzI1NiJ9.wr0ng-podtap-token-9876543210"
LOGGER = "podtap.kube"
TLS_NAME = "apiserver"


@pytest.fixture
def server(tls: TLSFiles) -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN, tls=tls) as fake:
        fake.add_namespace("shop", {"team": "a"})
        yield fake


@pytest.fixture
def api(server: FakeApiServer, token_file: Path) -> Iterator[client.CoreV1Api]:
    core = make_core_api(server.url, str(token_file), server.ca_path)
    yield core
    core.api_client.close()


class Changes:
    """on_change hook that records calls (from the watcher thread)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, name: str) -> None:
        with self._lock:
            self.names.append(name)

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.names)


@pytest.fixture
def watcher_factory() -> Iterator[Callable[..., NamespaceLabels]]:
    started: list[NamespaceLabels] = []

    def make(api: client.CoreV1Api, **kwargs: Any) -> NamespaceLabels:
        settings: dict[str, Any] = {
            "watch_timeout_s": 60,
            "request_timeout_s": 30.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
        }
        settings.update(kwargs)
        ns = NamespaceLabels(api, **settings)
        ns.start()
        started.append(ns)
        return ns

    yield make
    for ns in started:
        assert ns.stop(WAIT), "watcher thread did not stop"


# Waits are for a condition; this only bounds how long a broken test hangs (CI is loaded).
WAIT = 60.0


def eventually(check: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or check}")


def shop(**labels: str) -> dict[str, str]:
    return {**labels, NAME_LABEL: "shop"}


# --------------------------------------------------------------------------- list + watch


def test_list_then_watch_keeps_labels_current(
    server: FakeApiServer, api: client.CoreV1Api, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    changes = Changes()
    ns = watcher_factory(api, on_change=changes)
    assert ns.wait_synced(WAIT)
    assert ns.get("shop") == shop(team="a")
    assert ns.get("kube-system") == {NAME_LABEL: "kube-system"}
    assert ns.get("nope") == {}
    assert server.wait_for_watches(1)
    listed_rv = server.watch_resource_versions[0]
    assert listed_rv not in ("", "0"), "the watch must start from the list's resourceVersion"
    assert set(changes.seen()) == {*SYSTEM_NAMESPACES, "shop"}  # the list's namespaces

    server.add_namespace("web", {"tier": "front"})
    eventually(lambda: ns.get("web") == {"tier": "front", NAME_LABEL: "web"}, what="ADDED")
    server.label_namespace("shop", {"team": "b", "cost": "42"})
    eventually(lambda: ns.get("shop") == shop(team="b", cost="42"), what="MODIFIED")
    eventually(lambda: changes.seen().count("shop") == 2, what="on_change(shop)")
    server.delete_namespace("web")  # Terminating (labels unchanged), then DELETED
    eventually(lambda: "web" not in ns.snapshot(), what="DELETED")
    assert ns.get("web") == {}
    assert changes.seen()[-3:] == ["web", "shop", "web"]

    stats = ns.stats
    assert stats.synced and stats.lists == 1 and stats.errors == 0 and stats.expired == 0
    assert stats.watch_events == 4  # ADDED, MODIFIED, MODIFIED (Terminating), DELETED
    assert stats.namespaces == 5
    assert server.list_count == 1 and server.watch_count == 1


def test_returned_labels_are_copies(
    api: client.CoreV1Api, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    ns = watcher_factory(api)
    assert ns.wait_synced(WAIT)
    ns.get("shop")["team"] = "mutated"
    assert ns.get("shop") == shop(team="a")


def test_410_gone_relists_and_converges(
    server: FakeApiServer, api: client.CoreV1Api, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    changes = Changes()
    ns = watcher_factory(api, on_change=changes)
    assert ns.wait_synced(WAIT) and server.wait_for_watches(1)
    # While the agent cannot see it: a change, then compaction past everything it saw.
    server.down()
    server.label_namespace("shop", {"team": "c"})
    server.add_namespace("late", {"x": "y"})
    server.compact()
    server.up()
    eventually(lambda: ns.stats.expired >= 1, what="410 Gone")
    eventually(lambda: ns.get("shop") == shop(team="c"), what="relist converges")
    assert ns.get("late") == {"x": "y", NAME_LABEL: "late"}
    assert ns.stats.lists == 2
    assert {"shop", "late"} <= set(changes.seen())
    # and it watches again, from the new list's resourceVersion
    server.add_namespace("after", {})
    eventually(lambda: ns.get("after") == {NAME_LABEL: "after"}, what="watch after relist")
    assert ns.stats.lists == 2


def test_410_on_an_open_connection_too(
    server: FakeApiServer, api: client.CoreV1Api, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    ns = watcher_factory(api)
    assert ns.wait_synced(WAIT) and server.wait_for_watches(1)
    server.compact()
    server.drop_watches()  # resumes from a resourceVersion that is now too old
    eventually(lambda: ns.stats.lists == 2, what="relist")
    assert ns.stats.expired == 1
    assert ns.stats.errors == 0  # a 410 is routine, not an error


def test_bookmark_keeps_resume_point_fresh(
    server: FakeApiServer, api: client.CoreV1Api, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    ns = watcher_factory(api)
    assert ns.wait_synced(WAIT) and server.wait_for_watches(1)
    server.compact()
    server.send_bookmark()  # carries the post-compaction resourceVersion
    eventually(lambda: ns.stats.bookmarks == 1, what="bookmark")
    server.drop_watches()
    assert server.wait_for_watches(2)
    assert server.watch_resource_versions[-1] == str(server.resource_version)
    eventually(lambda: ns.stats.watch_drops == 1, what="drop counted")
    assert ns.stats.expired == 0 and ns.stats.lists == 1


def test_dropped_or_ended_watch_resumes_from_last_resource_version(
    server: FakeApiServer, api: client.CoreV1Api, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    ns = watcher_factory(api)
    assert ns.wait_synced(WAIT) and server.wait_for_watches(1)
    server.label_namespace("shop", {"team": "d"})
    eventually(lambda: ns.get("shop") == shop(team="d"))
    seen_rv = str(server.resource_version)

    assert server.drop_watches() == 1
    assert server.wait_for_watches(2)
    assert server.watch_resource_versions[1] == seen_rv
    server.end_watches()  # as timeoutSeconds would
    assert server.wait_for_watches(3)
    assert server.watch_resource_versions[2] == seen_rv
    server.add_namespace("new", {"a": "b"})
    eventually(lambda: ns.get("new") == {"a": "b", NAME_LABEL: "new"})
    stats = ns.stats
    assert stats.lists == 1 and stats.watch_drops == 1 and stats.errors == 0


def test_watch_timeout_seconds_is_sent_and_honoured(
    server: FakeApiServer, api: client.CoreV1Api, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    ns = watcher_factory(api, watch_timeout_s=1)
    assert ns.wait_synced(WAIT)
    assert server.wait_for_watches(2, timeout=WAIT), "a new watch after timeoutSeconds=1"
    assert ns.stats.lists == 1 and ns.stats.errors == 0


def test_server_down_counts_errors_logs_once_and_recovers(
    server: FakeApiServer,
    api: client.CoreV1Api,
    watcher_factory: Callable[..., NamespaceLabels],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    ns = watcher_factory(api)
    assert ns.wait_synced(WAIT) and server.wait_for_watches(1)
    server.down()
    eventually(lambda: ns.stats.errors >= 4, what="errors while down")
    assert ns.get("shop") == shop(team="a")  # what was known stays
    assert ns.get("unknown") == {}
    server.label_namespace("shop", {"team": "e"})
    server.up()
    eventually(lambda: ns.get("shop") == shop(team="e"), what="recovery")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot connect" in warnings[0].getMessage()
    assert "Connection refused" in warnings[0].getMessage()
    assert "0x" not in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert ns.stats.lists == 1  # history covered the outage: no relist needed


def test_get_never_raises_before_sync(
    tls: TLSFiles, token_file: Path, watcher_factory: Callable[..., NamespaceLabels]
) -> None:
    server = FakeApiServer(token=TOKEN, tls=tls).start()
    url = server.url
    server.stop()  # nothing listens at url any more
    core = make_core_api(url, str(token_file), str(tls.ca_cert))
    try:
        ns = watcher_factory(core)
        eventually(lambda: ns.stats.errors >= 1, what="a failed list")
        assert ns.get("shop") == {} and not ns.synced
    finally:
        core.api_client.close()


def test_wrong_token_logged_once_never_leaked_and_rotation_recovers(
    server: FakeApiServer,
    token_file: Path,
    watcher_factory: Callable[..., NamespaceLabels],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's included
    token_file.write_text(WRONG)
    core = make_core_api(server.url, str(token_file), server.ca_path)
    try:
        ns = watcher_factory(core)
        eventually(lambda: ns.stats.errors >= 3, what="401s")
        assert not ns.synced and ns.get("shop") == {}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "HTTP 401" in errors[0].getMessage()
        assert "token" in errors[0].getMessage()
        assert WRONG not in ns.stats.last_error
        # the token rotates: the file is re-read and the agent gets in
        token_file.write_text(TOKEN)
        assert ns.wait_synced(WAIT)
        assert ns.get("shop") == shop(team="a")
        text = caplog.text + "".join(str(r.args) for r in caplog.records)
        assert WRONG not in text and TOKEN not in text
        assert server.unauthorized_count >= 3
    finally:
        core.api_client.close()


def test_forbidden_namespaces_names_the_rbac_rule(
    server: FakeApiServer,
    api: client.CoreV1Api,
    watcher_factory: Callable[..., NamespaceLabels],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server.forbid("/api/v1/namespaces")
    ns = watcher_factory(api)
    eventually(lambda: ns.stats.errors >= 2)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "HTTP 403" in errors[0] and '"namespaces"' in errors[0] and '"watch"' in errors[0]
    server.allow("/api/v1/namespaces")
    assert ns.wait_synced(WAIT)


def test_tls_is_verified(
    server: FakeApiServer,
    token_file: Path,
    tmp_path: Path,
    watcher_factory: Callable[..., NamespaceLabels],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    other = generate_tls(tmp_path / "other", name="impostor")
    core = make_core_api(server.url, str(token_file), str(other.ca_cert))
    try:
        ns = watcher_factory(core)
        eventually(lambda: ns.stats.errors >= 1)
        assert not ns.synced
        assert "TLS error" in ns.stats.last_error
        assert "CERTIFICATE_VERIFY_FAILED" in ns.stats.last_error
        assert server.list_count == 0
    finally:
        core.api_client.close()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_insecure_skip_verify_is_loud(
    server: FakeApiServer, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    insecure = make_core_api(server.url, str(token_file), None, insecure_skip_verify=True)
    try:
        assert node_labels(insecure, "simnode-1")["kubernetes.io/os"] == "linux"
    finally:
        insecure.api_client.close()
    assert any("insecure_skip_verify" in r.getMessage() for r in caplog.records)


def test_on_change_failure_does_not_stop_the_watch(
    server: FakeApiServer,
    api: client.CoreV1Api,
    watcher_factory: Callable[..., NamespaceLabels],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(name: str) -> None:
        raise RuntimeError("boom")

    ns = watcher_factory(api, on_change=broken)
    assert ns.wait_synced(WAIT)
    server.add_namespace("more", {"k": "v"})
    eventually(lambda: ns.get("more") == {"k": "v", NAME_LABEL: "more"})
    eventually(lambda: ns.stats.hook_errors == 6)  # 5 from the list, 1 from the watch
    failures = [r for r in caplog.records if "on_change" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_stop_is_prompt_while_watching_and_while_backing_off(
    server: FakeApiServer, api: client.CoreV1Api
) -> None:
    ns = NamespaceLabels(api, watch_timeout_s=300)
    ns.start()
    assert ns.wait_synced(WAIT) and server.wait_for_watches(1)
    time.sleep(0.1)  # most likely blocked in the watch read by now (prompt either way)
    t0 = time.monotonic()
    assert ns.stop(WAIT)
    assert time.monotonic() - t0 < 15.0  # not the watch's 300 s

    server.down()
    ns2 = NamespaceLabels(api, backoff_initial_s=30, backoff_max_s=60)
    ns2.start()
    eventually(lambda: ns2.stats.errors >= 1)
    t0 = time.monotonic()
    assert ns2.stop(WAIT)
    assert time.monotonic() - t0 < 15.0  # not the 30 s backoff


# --------------------------------------------------------------------------- node labels


def test_node_labels(server: FakeApiServer, api: client.CoreV1Api) -> None:
    labels = node_labels(api, "simnode-1")
    assert labels["kubernetes.io/hostname"] == "simnode-1"
    assert labels["topology.kubernetes.io/zone"] == "zone-a"


def test_node_labels_forbidden_names_get_nodes(
    server: FakeApiServer, api: client.CoreV1Api, caplog: pytest.LogCaptureFixture
) -> None:
    server.forbid("/api/v1/nodes/simnode-1")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert node_labels(api, "simnode-1") == {}
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "get nodes" in record.getMessage() and "403" in record.getMessage()


def test_node_labels_missing_node_or_server(
    server: FakeApiServer, api: client.CoreV1Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert node_labels(api, "no-such-node") == {}
    assert "no-such-node not found" in caplog.records[-1].getMessage()
    assert node_labels(api, "") == {}
    server.down()
    assert node_labels(api, "simnode-1", timeout_s=2) == {}
    assert "cannot connect" in caplog.records[-1].getMessage()
    assert all(r.levelno == logging.WARNING for r in caplog.records)


# --------------------------------------------------------------------------- construction


def test_in_cluster_configuration(server: FakeApiServer, token_file: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    core = make_core_api(None, str(token_file), server.ca_path, environ=env)
    try:
        assert node_labels(core, "simnode-1")["kubernetes.io/os"] == "linux"
    finally:
        core.api_client.close()
    v6 = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster_url(v6) == "https://[fd00::1]:443"
    with pytest.raises(ApiServerConfigError, match="KUBERNETES_SERVICE_HOST"):
        make_core_api(None, str(token_file), server.ca_path, environ={})
    with pytest.raises(ApiServerConfigError, match="token file"):
        make_core_api(server.url, str(token_file) + ".missing", server.ca_path)
    with pytest.raises(ApiServerConfigError, match="CA bundle"):
        make_core_api(server.url, str(token_file), server.ca_path + ".missing")
    with pytest.raises(ApiServerConfigError, match="https"):
        make_core_api("http://127.0.0.1:1", str(token_file), server.ca_path)


# --------------------------------------------------------------------------- the fake itself


def _raw_get(server: FakeApiServer, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=server.ca_path)
    request = urllib.request.Request(server.url + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_fake_apiserver_wire_shapes(server: FakeApiServer) -> None:
    code, body = _raw_get(server, "/api/v1/namespaces", token=None)
    assert code == 401
    assert json.loads(body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    code, body = _raw_get(server, "/api/v1/namespaces")
    listing = json.loads(body)
    assert code == 200 and listing["kind"] == "NamespaceList"
    assert listing["metadata"]["resourceVersion"] == str(server.resource_version)
    assert "kind" not in listing["items"][0]
    old = int(listing["metadata"]["resourceVersion"])
    server.label_namespace("shop", {"team": "z"})
    code, body = _raw_get(
        server, f"/api/v1/namespaces?watch=1&resourceVersion={old}&timeoutSeconds=1"
    )
    (event,) = [json.loads(line) for line in body.splitlines()]
    assert event["type"] == "MODIFIED" and event["object"]["kind"] == "Namespace"
    assert event["object"]["metadata"]["labels"] == {"team": "z", NAME_LABEL: "shop"}
    server.compact()
    code, body = _raw_get(server, f"/api/v1/namespaces?watch=1&resourceVersion={old}")
    (event,) = [json.loads(line) for line in body.splitlines()]
    assert code == 200 and event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    assert event["object"]["message"].startswith(f"too old resource version: {old} (")
    code, body = _raw_get(server, "/api/v1/nodes/ghost")
    assert code == 404 and json.loads(body)["details"] == {"name": "ghost", "kind": "nodes"}
