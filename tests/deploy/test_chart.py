"""The Helm chart, rendered and linted by Helm's real engine (helm-python-sdk), every object
validated against the official Kubernetes schemas (strict), and what matters asserted for each
values file in tests/deploy/values/."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.deploy.chart import (
    KUBE_VERSIONS,
    REPO,
    VALUES_FILES,
    Rendered,
    notes,
    render_module,
    render_objects,
    rendered,
    values,
)

CHART = REPO / "deploy" / "helm" / "podtap"
HOST_MOUNTS = {
    "/sys/fs/cgroup": True,  # path in the pod -> read-only
    "/sys/kernel/tracing": False,
    "/sys/kernel/debug": False,
    "/sys/kernel/btf": True,
    "/lib/modules": True,
    "/usr/src": True,
    "/var/cache/podtap": False,
}
DOWNWARD_ENV = {
    "NODE_NAME": "spec.nodeName",
    "NODE_IP": "status.hostIP",
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "POD_UID": "metadata.uid",
}
CAPABILITIES = ["BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE", "DAC_READ_SEARCH", "SYS_PTRACE"]


# --- every values file: lint, render, schema-validate, dry-run --------------------------------

@pytest.mark.parametrize("name", VALUES_FILES)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_lint_is_clean(name: str, kube: str) -> None:
    report = helm.lint(str(CHART), values(name), strict=True, kube_version=f"v{kube}")
    assert report["errors"] == []
    # Severity 1 is "info" (an icon is recommended); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUES_FILES)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_object_is_valid_for_kubernetes(name: str, kube: str) -> None:
    objects = render_objects(values(name))
    assert objects
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a CRD: its shape is asserted below
            continue
        kubernetes_validate.validate(obj, kube, strict=True)


def test_validation_can_fail() -> None:
    """The strict schemas reject what the API server would (a misspelt field)."""
    ds = copy.deepcopy(rendered("default").one("DaemonSet"))
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBE_VERSIONS[0], strict=True)


def _pod_env(r: Rendered) -> dict[str, str]:
    """The environment the DaemonSet gives the agent, with stand-ins for what the cluster fills."""
    env = {}
    for name, e in r.env().items():
        env[name] = e.get("value", f"from-cluster-{name.lower()}")
    return env


@pytest.mark.parametrize("name", VALUES_FILES)
def test_rendered_config_passes_podtap_dry_run(name: str, tmp_path: Path) -> None:
    r = rendered(name)
    path = tmp_path / "podtap.yaml"
    path.write_text(r.one("ConfigMap")["data"]["podtap.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTAP_")}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--dry-run", "-c", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**env, **_pod_env(r)},
    )
    assert proc.returncode == 0, proc.stderr
    effective = yaml.safe_load(proc.stdout)
    assert set(effective["sinks"]) == set(r.config["sinks"])
    assert effective["telemetry"]["port"] == r.agent["ports"][0]["containerPort"]


def test_dry_run_rejects_a_config_the_agent_cannot_use(tmp_path: Path) -> None:
    path = tmp_path / "podtap.yaml"
    path.write_text("sinks:\n  es:\n    kind: elasticsearch\n")  # no url
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--dry-run", "-c", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "sinks.es.url" in proc.stderr


# --- values that must fail at install time, with a message naming the value ------------------

BAD_VALUES = [
    ({"elasticsearch": {"enabled": True}}, "/elasticsearch/url"),
    ({"loki": {"enabled": True, "url": "loki:3100"}}, "/loki/url"),
    ({"otlp": {"enabled": True, "url": "ftp://otel"}}, "/otlp/url"),
    ({"elasticsearch": {"auth": {"password": "hunter2"}}}, "additional properties 'password'"),
    ({"loki": {"auth": {"token": "t"}}}, "additional properties 'token'"),
    ({"config": {"sinks": {"es": {"kind": "elasticsearch", "auth": {"password": "x"}}}}},
     "/config/sinks/es/auth"),
    ({"config": {"sinks": {"es": {"kind": "kafka"}}}}, "/config/sinks/es/kind"),
    ({"config": {"capture": {"ring_bytes": "64Mi"}}}, "/config/capture/ring_bytes"),
    ({"config": {"captures": {}}}, "additional properties 'captures'"),
    ({"config": {"records": {"schema": "ecs"}}}, "/config/records/schema"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"tolerationz": []}, "additional properties 'tolerationz'"),
    ({"updateStrategy": {"type": "Recreate"}}, "/updateStrategy/type"),
    ({"service": {"port": 70000}}, "/service/port"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"persistence": {"hostPath": {"path": "var/lib/podtap"}}}, "/persistence/hostPath/path"),
    ({"rbac": {"nodesProxy": "yes"}}, "/rbac/nodesProxy"),
]


@pytest.mark.parametrize(("vals", "message"), BAD_VALUES)
def test_bad_values_fail_the_schema_with_a_clear_message(
    vals: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as e:
        render_objects(vals)
    assert message in str(e.value)


def test_template_checks_fail_with_a_clear_message() -> None:
    with pytest.raises(helm.HelmRenderError, match="telemetry.enabled"):
        render_objects({"config": {"telemetry": {"enabled": False}}})
    with pytest.raises(helm.HelmRenderError, match="needs service.enabled"):
        render_objects({"service": {"enabled": False},
                        "metrics": {"serviceMonitor": {"enabled": True}}})


# --- the default render ------------------------------------------------------------------------

def test_default_render_has_the_objects_of_a_node_agent() -> None:
    r = rendered("default")
    kinds = sorted(o["kind"] for o in r.objects)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Service",
                     "ServiceAccount"]


def test_daemonset_sees_the_host() -> None:
    r = rendered("default")
    pod = r.pod
    assert pod["hostPID"] is True
    assert pod["serviceAccountName"] == r.one("ServiceAccount")["metadata"]["name"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert r.one("DaemonSet")["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    for name, field in DOWNWARD_ENV.items():
        assert r.env()[name]["valueFrom"]["fieldRef"]["fieldPath"] == field
    volumes = r.volumes()
    mounts = r.mounts()
    for path, read_only in HOST_MOUNTS.items():
        mount = mounts[path]
        assert mount.get("readOnly", False) is read_only, path
        host = volumes[mount["name"]]["hostPath"]["path"]
        assert host == path or (path == "/var/cache/podtap" and host == "/var/cache/podtap")
    assert volumes[mounts["/var/lib/podtap"]["name"]]["hostPath"] == {
        "path": "/var/lib/podtap", "type": "DirectoryOrCreate"}
    assert r.agent["securityContext"]["privileged"] is True
    assert r.agent["securityContext"]["readOnlyRootFilesystem"] is True


def test_agent_runs_the_mounted_config_and_probes_its_telemetry_port() -> None:
    r = rendered("default")
    agent = r.agent
    assert agent["args"] == ["run", "-c", "/etc/podtap/podtap.yaml"]
    assert r.mounts()["/etc/podtap"]["readOnly"] is True
    assert agent["ports"] == [{"name": "http", "containerPort": 2020, "protocol": "TCP"}]
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert agent["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert r.config["telemetry"]["port"] == 2020
    assert r.config["sinks"] == {"stdout": {"kind": "stdout"}}
    svc = r.one("Service")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 2020, "targetPort": "http",
                                     "protocol": "TCP"}]
    assert svc["spec"]["selector"] == r.one("DaemonSet")["spec"]["selector"]["matchLabels"]


def test_init_container_checks_the_node_with_the_agents_view() -> None:
    r = rendered("default")
    (init,) = r.pod["initContainers"]
    assert init["args"] == ["check", "-c", "/etc/podtap/podtap.yaml"] == [
        "check", *r.agent["args"][1:]]  # the agent's own configuration file
    assert {"name": "config", "mountPath": "/etc/podtap", "readOnly": True} in (
        init["volumeMounts"])
    assert init["image"] == r.agent["image"] == "podtap/podtap:0.1.0"
    assert init["securityContext"] == r.agent["securityContext"]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    for path in HOST_MOUNTS:
        assert path in r.mounts(init)


def test_default_rbac_is_get_on_nodes_pods_only() -> None:
    r = rendered("default")
    assert r.rules() == [("nodes/pods", "get")]
    binding = r.one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == r.one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "podtap",
                                    "namespace": "podtap"}]


def test_config_checksum_rolls_the_pods_when_the_config_changes() -> None:
    def checksum(vals: dict[str, Any]) -> str:
        ann: str = rendered(vals).one("DaemonSet")["spec"]["template"]["metadata"][
            "annotations"]["checksum/config"]
        return ann

    base = checksum({})
    assert len(base) == 64
    assert checksum({}) == base
    assert checksum({"config": {"kube": {"poll_interval_s": 5}}}) != base
    assert checksum({"loki": {"enabled": True, "url": "http://loki"}}) != base
    assert checksum({"podAnnotations": {"a": "b"}}) == base
    # It is the hash of the ConfigMap as rendered.
    rendered_cm = render_module().render({})["podtap/templates/configmap.yaml"]
    assert hashlib.sha256(rendered_cm.encode()).hexdigest() == base


# --- capabilities mode, RBAC variants, ServiceMonitor --------------------------------------------

def test_capabilities_mode_is_not_privileged() -> None:
    r = rendered("capabilities")
    for container in (r.agent, r.pod["initContainers"][0]):
        sc = container["securityContext"]
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
        assert sc["allowPrivilegeEscalation"] is False
    assert r.pod["hostPID"] is True


def test_namespace_and_node_labels_add_their_rbac() -> None:
    assert rendered("namespace-labels").rules() == sorted([
        ("nodes/pods", "get"), ("nodes", "get"),
        ("namespaces", "get"), ("namespaces", "list"), ("namespaces", "watch"),
    ])
    only_ns = rendered({"config": {"records": {"include_namespace_labels": True}}}).rules()
    assert ("nodes", "get") not in only_ns and ("namespaces", "watch") in only_ns
    only_node = rendered({"config": {"records": {"include_node_labels": True}}}).rules()
    assert ("nodes", "get") in only_node and ("namespaces", "list") not in only_node


def test_old_clusters_get_nodes_proxy() -> None:
    r = rendered("old-cluster")
    assert r.rules() == [("nodes/pods", "get"), ("nodes/proxy", "get")]
    assert r.pod["priorityClassName"] == "system-node-critical"
    assert "nodes/proxy" in notes(values("old-cluster"))


def test_no_rbac_and_an_existing_service_account() -> None:
    r = rendered({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "logs"}})
    assert r.all("ClusterRole") == r.all("ClusterRoleBinding") == r.all("ServiceAccount") == []
    assert r.pod["serviceAccountName"] == "logs"


def test_service_monitor_scrapes_the_service() -> None:
    assert rendered("default").all("ServiceMonitor") == []
    r = rendered("servicemonitor")
    sm = r.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service_labels = r.one("Service")["metadata"]["labels"]
    for key, value in sm["spec"]["selector"]["matchLabels"].items():
        assert service_labels[key] == value
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["podtap"]}
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s",
                                        "scrapeTimeout": "10s"}]


# --- sink conveniences: credentials from Secrets, as files, never inline -----------------------

def _secret_files(r: Rendered, sink: str) -> dict[str, tuple[str, str]]:
    """File name -> (secret, key) of the sink's projected secrets volume, checked mounted."""
    mount = r.mounts()[f"/etc/podtap/secrets/{sink}"]
    assert mount["readOnly"] is True
    volume = r.volumes()[mount["name"]]["projected"]
    assert volume["defaultMode"] == 0o400
    out = {}
    for source in volume["sources"]:
        (item,) = source["secret"]["items"]
        out[item["path"]] = (source["secret"]["name"], item["key"])
    return out


def test_elasticsearch_sink() -> None:
    r = rendered("elasticsearch")
    sink = r.config["sinks"]["elasticsearch"]
    assert sink == {
        "kind": "elasticsearch",
        "url": "https://elasticsearch-master.logging:9200",
        "elasticsearch": {"index": "logs-podtap-default", "data_stream": True},
        "auth": {"username": "podtap",
                 "password_file": "/etc/podtap/secrets/elasticsearch/password"},
        "tls": {"ca_file": "/etc/podtap/secrets/elasticsearch/ca.crt"},
        "buffer": {"disk_dir": "/var/lib/podtap/buffer"},
    }
    assert set(r.config["sinks"]) == {"elasticsearch"}  # no stdout sink once a backend is set
    assert _secret_files(r, "elasticsearch") == {
        "password": ("es-credentials", "password"), "ca.crt": ("es-ca", "ca.crt")}


def test_loki_sink() -> None:
    r = rendered("loki")
    assert r.config["sinks"] == {"loki": {
        "kind": "loki", "url": "http://loki-gateway.logging", "loki": {"tenant": "team-a"},
        "auth": {"token_file": "/etc/podtap/secrets/loki/token"},
        "buffer": {"disk_dir": "/var/lib/podtap/buffer"},
    }}
    assert _secret_files(r, "loki") == {"token": ("loki-token", "token")}


def test_otlp_sink() -> None:
    r = rendered("otlp")
    assert r.config["sinks"] == {"otlp": {
        "kind": "otlp", "url": "http://otel-collector.observability:4318",
        "headers": {"X-Source": "podtap"}, "auth": {"token_file": "/etc/podtap/secrets/otlp/token"},
        "buffer": {"disk_dir": "/var/lib/podtap/buffer"},
    }}
    assert _secret_files(r, "otlp") == {"token": ("otlp-token", "token")}


def test_insecure_skip_verify_is_passed_on() -> None:
    r = rendered({"loki": {"enabled": True, "url": "https://loki",
                           "tls": {"insecureSkipVerify": True}}})
    assert r.config["sinks"]["loki"]["tls"] == {"insecure_skip_verify": True}
    assert "/etc/podtap/secrets/loki" not in r.mounts()


def test_everything_at_once() -> None:
    r = rendered("everything")
    sinks = r.config["sinks"]
    assert set(sinks) == {"elasticsearch", "loki", "otlp", "archive"}
    assert sinks["elasticsearch"]["auth"] == {
        "api_key_file": "/etc/podtap/secrets/elasticsearch/api_key"}
    assert sinks["loki"]["auth"] == {"username": "12345",
                                     "password_file": "/etc/podtap/secrets/loki/password"}
    assert sinks["loki"]["batch"] == {"max_age_s": 2.0}  # config.sinks merged key by key
    assert sinks["loki"]["kind"] == "loki"
    assert "auth" not in sinks["otlp"] and "/etc/podtap/secrets/otlp" not in r.mounts()
    assert all("buffer" not in s for s in sinks.values())  # persistence off: no disk buffer
    assert _secret_files(r, "elasticsearch") == {"api_key": ("es-api-key", "api_key")}
    assert _secret_files(r, "loki") == {"password": ("grafana-cloud", "password")}
    assert r.env()["PODTAP_KUBE_POLL_INTERVAL_S"]["value"] == "5"
    assert r.agent["ports"][0]["containerPort"] == 2021
    assert r.one("ServiceMonitor")["metadata"]["name"] == "logs"
    assert "initContainers" not in r.pod
    assert "/lib/modules" not in r.mounts() and "/var/lib/podtap" not in r.mounts()
    assert r.mounts()["/extra"]["name"] == "extra"
    assert r.agent["image"] == "registry.example.com/podtap:0.1.0"
    assert r.pod["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize("name", VALUES_FILES)
def test_no_credential_is_inline(name: str) -> None:
    """Whatever the values, the ConfigMap names files and variables, never secrets, and no
    Secret reaches the environment."""
    r = rendered(name)
    for sink in r.config["sinks"].values():
        auth = sink.get("auth", {})
        assert not {"password", "token", "api_key"} & set(auth)
    for e in r.env().values():
        assert "secretKeyRef" not in e.get("valueFrom", {})


# --- generated files in sync ----------------------------------------------------------------------

def test_values_schema_and_manifests_are_up_to_date() -> None:
    stale = render_module().stale_files()
    assert stale == [], f"run `make manifests`: {stale}"


def test_values_schema_config_is_podtaps_own_schema() -> None:
    import json

    from agent.config import json_schema

    chart_schema = json.loads((CHART / "values.schema.json").read_text())
    want = json.loads(json.dumps(json_schema()))  # tuples as lists, as printed
    want.pop("$schema", None)
    got = dict(chart_schema["properties"]["config"])
    got.pop("description", None)
    want.pop("description", None)
    assert got == want


def test_manifests_are_the_default_render_plus_a_namespace() -> None:
    manifests = REPO / "deploy" / "manifests"
    objects = [yaml.safe_load(p.read_text()) for p in sorted(manifests.glob("*.yaml"))]
    assert [o["kind"] for o in objects] == ["Namespace", "ServiceAccount", "ClusterRole",
                                            "ClusterRoleBinding", "ConfigMap", "Service",
                                            "DaemonSet"]
    ns = objects[0]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert "helm.sh/chart" not in labels and labels.get(
            "app.kubernetes.io/managed-by") != "Helm"
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "podtap"
        for kube in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, kube, strict=True)


def test_stale_manifests_are_detected(tmp_path: Path) -> None:
    for p in (REPO / "deploy" / "manifests").glob("*.yaml"):
        (tmp_path / p.name).write_text(p.read_text())
    mod = render_module()
    assert mod.stale_files(tmp_path) == []
    ds = tmp_path / "50-daemonset.yaml"
    ds.write_text(ds.read_text().replace("hostPID: true", "hostPID: false"))
    (tmp_path / "99-extra.yaml").write_text("kind: ConfigMap\n")
    (tmp_path / "00-namespace.yaml").unlink()
    assert mod.stale_files(tmp_path) == [
        str(tmp_path / name) for name in ("00-namespace.yaml", "50-daemonset.yaml", "99-extra.yaml")
    ]


# --- the values examples of docs/deploy.md ------------------------------------------------------

def _doc_examples() -> list[dict[str, Any]]:
    import re

    text = (REPO / "docs" / "deploy.md").read_text()
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def _deep_merge(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def test_docs_examples_render_and_validate(tmp_path: Path) -> None:
    examples = _doc_examples()
    assert len(examples) >= 5
    for example in examples:
        for obj in render_objects(example):
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    merged: dict[str, Any] = {}
    for example in examples:
        _deep_merge(merged, example)
    r = rendered(merged)
    assert set(r.config["sinks"]) == {"elasticsearch", "loki", "otlp", "archive"}
    path = tmp_path / "podtap.yaml"
    path.write_text(r.one("ConfigMap")["data"]["podtap.yaml"])
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--dry-run", "-c", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def _agent_config(vals: dict[str, Any]) -> dict[str, Any]:
    cm = rendered(vals).one("ConfigMap")
    (text,) = cm["data"].values()
    return dict(yaml.safe_load(text))


def test_agents_exclude_their_own_pods_by_the_charts_name_label() -> None:
    pod_labels = rendered({}).one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    selector = _agent_config({})["kube"]["agent_pod_selector"]
    key, value = selector.split("=")
    assert pod_labels[key] == value
    renamed = _agent_config({"nameOverride": "logtap"})["kube"]["agent_pod_selector"]
    assert renamed == "app.kubernetes.io/name=logtap"
    own = {"config": {"kube": {"agent_pod_selector": "team=logs"}}}
    assert _agent_config(own)["kube"]["agent_pod_selector"] == "team=logs"
