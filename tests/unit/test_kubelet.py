"""KubeletClient against the loopback FakeKubelet over real HTTPS (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.kube import kubelet as kubelet_module
from agent.kube import token as token_module
from agent.kube.kubelet import (
    KubeletAuthError,
    KubeletClient,
    KubeletConfig,
    KubeletError,
)
from simnode.kubelet import FakeKubelet
from simnode.tls import TLSFiles, generate_tls

TOKEN = "eyJhbGciOiJSUzI1NiJ9.s3cr3t-podtap-token-0123456789"
ROTATED = "eyJhbGciOiJSUzI1NiJ9.r0tat3d-podtap-token-9876543210"
CID = "containerd://" + "0123456789abcdef" * 4
RETRIES = 2


@pytest.fixture(scope="module")
def other_tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return generate_tls(tmp_path_factory.mktemp("other-tls"), name="impostor")


@pytest.fixture
def kubelet(tls: TLSFiles) -> Iterator[FakeKubelet]:
    with FakeKubelet(token=TOKEN, tls=tls) as fake:
        fake.add_pod("default", "web-0", containers=[("web", "nginx:1.27", CID)])
        yield fake


def config_for(kubelet: FakeKubelet, token_file: Path | None, **overrides: Any) -> KubeletConfig:
    settings: dict[str, Any] = {
        "url": kubelet.url,
        "token_path": str(token_file) if token_file else None,
        "ca_path": kubelet.ca_path,
        "timeout_s": 30.0,  # a loaded CI machine; the timeout tests set their own
        "retries": RETRIES,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
    }
    settings.update(overrides)
    return KubeletConfig(**settings)


def fetch(config: KubeletConfig, times: int = 1) -> list[dict[str, Any]]:
    """get_pods `times` times with one client; the last answer."""

    async def run() -> list[dict[str, Any]]:
        try:
            async with KubeletClient(config) as client:
                pods: list[dict[str, Any]] = []
                for _ in range(times):
                    pods = await client.get_pods()
                return pods
        finally:
            await asyncio.sleep(0.05)  # let TLS connections dropped on timeout finish closing

    return asyncio.run(run())


def fetch_error(config: KubeletConfig) -> KubeletError:
    with pytest.raises(KubeletError) as info:
        fetch(config)
    return info.value


def names(pods: list[dict[str, Any]]) -> list[str]:
    return [pod["metadata"]["name"] for pod in pods]


# ---------------------------------------------------------------- success


def test_pods_fetched_over_tls_verified_against_the_ca(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    pods = fetch(config_for(kubelet, token_file))

    assert names(pods) == ["web-0"]
    status = pods[0]["status"]["containerStatuses"][0]
    assert status["containerID"] == CID
    assert kubelet.request_count == 1
    assert kubelet.unauthorized_count == 0


def test_empty_node_items_null_is_an_empty_list(kubelet: FakeKubelet, token_file: Path) -> None:
    kubelet.clear_pods()

    assert fetch(config_for(kubelet, token_file)) == []


def test_pods_added_and_removed_are_seen_by_the_next_call(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    async def run() -> tuple[list[str], list[str]]:
        async with KubeletClient(config_for(kubelet, token_file)) as client:
            kubelet.add_pod("kube-system", "proxy-x", containers=[("p", "kube-proxy:v1", CID)])
            first = names(await client.get_pods())
            kubelet.remove_pod("default", "web-0")
            return first, names(await client.get_pods())

    first, second = asyncio.run(run())

    assert sorted(first) == ["proxy-x", "web-0"]
    assert second == ["proxy-x"]


# ---------------------------------------------------------------- TLS


def test_wrong_ca_is_a_clear_tls_error_and_not_retried(
    kubelet: FakeKubelet, token_file: Path, other_tls: TLSFiles
) -> None:
    error = fetch_error(config_for(kubelet, token_file, ca_path=str(other_tls.ca_cert)))

    assert not isinstance(error, KubeletAuthError)
    assert "TLS verification" in str(error)
    assert str(other_tls.ca_cert) in str(error)
    assert kubelet.request_count == 0  # the handshake failed: no HTTP request was made


def test_missing_ca_file_is_a_kubelet_error(
    kubelet: FakeKubelet, token_file: Path, tmp_path: Path
) -> None:
    error = fetch_error(config_for(kubelet, token_file, ca_path=str(tmp_path / "nope.crt")))

    assert "CA bundle" in str(error)


def test_insecure_skip_verify_works_and_warns_once(
    kubelet: FakeKubelet,
    token_file: Path,
    other_tls: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="podtap.kube")
    config = config_for(
        kubelet, token_file, ca_path=str(other_tls.ca_cert), insecure_skip_verify=True
    )

    pods = fetch(config, times=3)

    assert names(pods) == ["web-0"]
    warnings = [
        r for r in caplog.records if r.name == "podtap.kube" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "insecure_skip_verify" in warnings[0].getMessage()


# ---------------------------------------------------------------- token


def test_rotated_token_is_read_on_the_next_call_without_restart(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    async def run() -> list[str]:
        async with KubeletClient(config_for(kubelet, token_file)) as client:
            await client.get_pods()
            rotate_token_file(token_file, ROTATED)
            kubelet.token = ROTATED
            return names(await client.get_pods())

    assert asyncio.run(run()) == ["web-0"]
    assert kubelet.request_count == 2  # the change was seen before sending: no 401 round trip
    assert kubelet.unauthorized_count == 0


def test_rotation_the_stat_check_misses_is_recovered_by_one_reread_on_401(
    kubelet: FakeKubelet, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(token_module.TokenFile, "_stat", lambda self: (0,))

    async def run() -> list[str]:
        async with KubeletClient(config_for(kubelet, token_file)) as client:
            await client.get_pods()
            rotate_token_file(token_file, ROTATED)
            kubelet.token = ROTATED
            return names(await client.get_pods())

    assert asyncio.run(run()) == ["web-0"]
    assert kubelet.unauthorized_count == 1
    assert kubelet.request_count == 3


def test_missing_token_file_is_a_kubelet_error(kubelet: FakeKubelet, tmp_path: Path) -> None:
    error = fetch_error(config_for(kubelet, tmp_path / "absent-token"))

    assert "absent-token" in str(error)
    assert kubelet.request_count == 0


def test_token_file_with_several_lines_is_refused_without_echoing_it(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    token_file.write_text(f"{TOKEN}\nsecond-line\n")

    error = fetch_error(config_for(kubelet, token_file))

    assert "control characters" in str(error)
    assert TOKEN not in str(error)


def rotate_token_file(path: Path, token: str) -> None:
    """Replace the file the way the kubelet does: a new inode swapped in atomically."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(token)
    os.replace(fresh, path)


# ---------------------------------------------------------------- auth errors


def test_401_raises_auth_error_naming_the_rbac_rule(kubelet: FakeKubelet, token_file: Path) -> None:
    kubelet.token = "a-token-the-agent-does-not-have"

    error = fetch_error(config_for(kubelet, token_file))

    assert isinstance(error, KubeletAuthError)
    assert error.status == 401
    assert "nodes/pods" in str(error)
    assert "nodes/proxy" in str(error)
    assert kubelet.request_count == 2  # one retry after re-reading the token, no more


def test_403_raises_auth_error_naming_the_rbac_rule(kubelet: FakeKubelet, token_file: Path) -> None:
    kubelet.mode = "403"

    error = fetch_error(config_for(kubelet, token_file))

    assert isinstance(error, KubeletAuthError)
    assert error.status == 403
    assert "nodes/pods" in str(error)
    assert '""' in str(error)  # the core API group
    assert "subresource(s)=[pods proxy]" in str(error)  # the kubelet's own words
    assert kubelet.request_count == 1


# ---------------------------------------------------------------- retries


def test_500_is_retried_then_raised_with_status_and_body(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    kubelet.mode = "500"

    error = fetch_error(config_for(kubelet, token_file))

    assert not isinstance(error, KubeletAuthError)
    assert error.status == 500
    assert "Internal Error" in str(error)
    assert kubelet.request_count == RETRIES + 1


def test_transient_500s_within_the_retry_budget_succeed(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    kubelet.fail_next(RETRIES, "500")

    assert names(fetch(config_for(kubelet, token_file))) == ["web-0"]
    assert kubelet.request_count == RETRIES + 1


def test_429_is_retried_with_retry_after_capped_by_backoff_max(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    kubelet.set_mode("429", retry_after_s=60)
    started = time.monotonic()

    error = fetch_error(config_for(kubelet, token_file))

    assert error.status == 429
    assert kubelet.request_count == RETRIES + 1
    # Honouring Retry-After would take RETRIES minutes; capped at backoff_max_s, seconds.
    assert time.monotonic() - started < 30


def test_other_4xx_is_not_retried(kubelet: FakeKubelet, token_file: Path) -> None:
    error = fetch_error(config_for(kubelet, token_file, url=kubelet.url + "/not-the-kubelet"))

    assert error.status == 404
    assert "404 page not found" in str(error)
    assert kubelet.request_count == 1


def test_slow_answer_times_out_each_attempt_then_fails(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    kubelet.set_mode("slow", slow_delay_s=120.0)
    started = time.monotonic()

    error = fetch_error(config_for(kubelet, token_file, timeout_s=2.0))

    assert "no answer within 2.0s" in str(error)
    assert kubelet.request_count == RETRIES + 1
    assert time.monotonic() - started < 60  # each attempt timed out, none waited 120 s


def test_server_down_is_a_kubelet_error_and_recovery_needs_no_new_client(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    async def run() -> tuple[KubeletError, list[str]]:
        async with KubeletClient(config_for(kubelet, token_file)) as client:
            await client.get_pods()  # leaves a keep-alive connection in the pool
            kubelet.mode = "down"
            with pytest.raises(KubeletError) as info:
                await client.get_pods()
            kubelet.mode = "ok"
            return info.value, names(await client.get_pods())

    error, after = asyncio.run(run())

    assert f"failed after {RETRIES + 1} attempt(s)" in str(error)
    assert error.status is None
    assert after == ["web-0"]


# ---------------------------------------------------------------- bad bodies


def test_malformed_json_is_a_kubelet_error(kubelet: FakeKubelet, token_file: Path) -> None:
    kubelet.mode = "malformed"

    error = fetch_error(config_for(kubelet, token_file))

    assert "malformed JSON" in str(error)
    assert kubelet.request_count == 1


def test_json_that_is_not_a_pod_list_is_a_kubelet_error(
    kubelet: FakeKubelet, token_file: Path
) -> None:
    kubelet.mode = "not_podlist"

    error = fetch_error(config_for(kubelet, token_file))

    assert "not PodList" in str(error)


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([], "JSON list"),
        ("PodList", "JSON str"),
        ({"kind": "PodList", "apiVersion": "v1", "metadata": {}}, "without 'items'"),
        ({"kind": "PodList", "items": {"a": 1}}, "'items' of type dict"),
        ({"kind": "PodList", "items": "nope"}, "'items' of type str"),
    ],
)
def test_bodies_that_are_not_pod_lists_are_kubelet_errors(doc: object, says: str) -> None:
    with pytest.raises(KubeletError, match=says):
        kubelet_module._pod_list_items(orjson.dumps(doc), "https://127.0.0.1:1/pods")


def test_pod_list_items_are_returned_as_sent() -> None:
    body = orjson.dumps({"kind": "PodList", "items": [{"metadata": {"name": "a"}}, 7]})

    assert kubelet_module._pod_list_items(body, "u") == [{"metadata": {"name": "a"}}, 7]


# ---------------------------------------------------------------- secrecy


def test_token_never_appears_in_errors_reprs_or_logs(
    kubelet: FakeKubelet,
    token_file: Path,
    other_tls: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    kubelet.fault_body = f"echo of your header: Authorization: Bearer {TOKEN}"
    config = config_for(kubelet, token_file)
    errors: list[BaseException] = []
    for mode in ["401", "403", "429", "500", "malformed", "not_podlist", "down"]:
        kubelet.mode = mode
        errors.append(fetch_error(config))
    kubelet.mode = "ok"
    errors.append(fetch_error(config_for(kubelet, token_file, ca_path=str(other_tls.ca_cert))))
    kubelet.token = "something-else"
    errors.append(fetch_error(config))

    texts = [repr(config), repr(KubeletClient(config))]
    for error in errors:
        texts += [str(error), repr(error), "".join(traceback.format_exception(error))]
    for record in caplog.records:
        texts += [record.getMessage(), repr(record.args), record.exc_text or ""]
    leaks = [text for text in texts if TOKEN in text]
    assert leaks == []
    assert any("<redacted>" in text for text in texts)  # the echoed token was scrubbed


# ---------------------------------------------------------------- config


def test_in_cluster_config_uses_node_ip_and_service_account_files() -> None:
    config = KubeletConfig.in_cluster({"NODE_IP": "10.0.3.7"})

    assert config.url == "https://10.0.3.7:10250"
    assert config.token_path == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert config.ca_path == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert config.insecure_skip_verify is False


def test_in_cluster_config_brackets_ipv6() -> None:
    assert KubeletConfig.in_cluster({"NODE_IP": "fd00::7"}).url == "https://[fd00::7]:10250"


def test_in_cluster_config_without_node_ip_says_how_to_set_it() -> None:
    with pytest.raises(KubeletError, match="status.hostIP"):
        KubeletConfig.in_cluster({})


@pytest.mark.parametrize(
    "overrides",
    [
        {"url": "http://127.0.0.1:10255"},
        {"url": "127.0.0.1:10250"},
        {"timeout_s": 0},
        {"retries": -1},
        {"backoff_initial_s": 2.0, "backoff_max_s": 1.0},
    ],
)
def test_config_rejects_nonsense(overrides: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"url": "https://127.0.0.1:10250", "token_path": None}
    settings.update(ca_path=None, **overrides)
    with pytest.raises(ValueError):
        KubeletConfig(**settings)


# ---------------------------------------------------------------- the fake, used synchronously


def test_fake_kubelet_serves_a_kubelet_shaped_pod_list_to_a_sync_client(
    kubelet: FakeKubelet,
) -> None:
    context = ssl.create_default_context(cafile=kubelet.ca_path)
    request = urllib.request.Request(
        kubelet.url + "/pods", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, context=context, timeout=5) as answer:
        doc = orjson.loads(answer.read())
        content_type = answer.headers["Content-Type"]

    assert content_type.startswith("application/json")
    assert (doc["kind"], doc["apiVersion"], doc["metadata"]) == ("PodList", "v1", {})
    pod = doc["items"][0]
    assert set(pod) == {"metadata", "spec", "status"}
    assert pod["spec"]["nodeName"] == kubelet.node_name
    assert pod["status"]["qosClass"] == "BestEffort"

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(kubelet.url + "/pods", context=context, timeout=5)
    assert info.value.code == 401
    assert info.value.read() == b"Unauthorized"


def test_client_settings_come_from_the_kube_section() -> None:
    from agent.config import KubeConfig

    kube = KubeConfig(token_path="/t", ca_path="/ca", timeout_s=2.5, retries=7,
                      insecure_skip_verify=True)
    cfg = KubeletConfig.from_section(kube, env={"NODE_IP": "10.1.2.3"})
    assert (cfg.url, cfg.token_path, cfg.ca_path) == ("https://10.1.2.3:10250", "/t", "/ca")
    assert (cfg.timeout_s, cfg.retries, cfg.insecure_skip_verify) == (2.5, 7, True)
    explicit = KubeletConfig.from_section(
        KubeConfig(kubelet_url="https://[fd00::1]:10250"), env={})
    assert explicit.url == "https://[fd00::1]:10250"
    with pytest.raises(KubeletError, match="NODE_IP"):
        KubeletConfig.from_section(KubeConfig(), env={})
