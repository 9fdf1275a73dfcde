"""Tests of the sinks, telemetry and agent configuration, the JSON Schema and --dry-run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from agent.config import (
    SINK_KINDS,
    Config,
    ConfigError,
    SinkConfig,
    config_from_dict,
    effective_config,
    json_schema,
)

ES = {"kind": "elasticsearch", "url": "https://es.example:9200"}


def error(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, env or {})
    return str(info.value)


def test_default_is_one_stdout_sink() -> None:
    assert Config().sinks == {"stdout": SinkConfig()}


def test_several_named_sinks() -> None:
    cfg = config_from_dict(
        {"sinks": {"es": ES, "loki": {"kind": "loki", "url": "http://loki:3100"}}}, {}
    )
    assert set(cfg.sinks) == {"es", "loki"}
    assert cfg.sinks["es"].kind == "elasticsearch"
    assert cfg.sinks["loki"].loki.labels == ("namespace", "pod", "container", "stream", "node")


@pytest.mark.parametrize(
    ("sink", "key"),
    [
        ({"kind": "kafka"}, "sinks.s.kind"),
        ({"kind": "loki"}, "sinks.s.url"),
        ({"kind": "loki", "url": "ftp://x"}, "sinks.s.url"),
        ({"kind": "loki", "url": "http://x:99999"}, "sinks.s.url"),
        ({"kind": "loki", "url": "http://"}, "sinks.s.url"),
        ({**ES, "gzip_level": 10}, "sinks.s.gzip_level"),
        ({**ES, "timeout_s": 0}, "sinks.s.timeout_s"),
        ({**ES, "max_in_flight": 0}, "sinks.s.max_in_flight"),
        ({**ES, "headers": {"Authorization": "x"}}, "sinks.s.headers.Authorization"),
        ({**ES, "tls": {"cert_file": "/c"}}, "sinks.s.tls.cert_file"),
        ({**ES, "auth": {"password_file": "/p"}}, "sinks.s.auth.username"),
        ({**ES, "auth": {"username": "u", "token_file": "/t"}}, "sinks.s.auth"),
        ({**ES, "batch": {"max_bytes": 10}}, "sinks.s.batch.max_bytes"),
        ({**ES, "batch": {"max_age_s": 0}}, "sinks.s.batch.max_age_s"),
        ({**ES, "retry": {"max_backoff_s": 0.1}}, "sinks.s.retry.max_backoff_s"),
        ({**ES, "buffer": {"mode": "always"}}, "sinks.s.buffer.disk_dir"),
        ({**ES, "buffer": {"mode": "sometimes"}}, "sinks.s.buffer.mode"),
        ({**ES, "buffer": {"memory_bytes": 1}}, "sinks.s.buffer.memory_bytes"),
        ({**ES, "elasticsearch": {"index": "Logs"}}, "sinks.s.elasticsearch.index"),
        ({**ES, "elasticsearch": {"index": "logs-%Y"}}, "sinks.s.elasticsearch.index"),
        ({**ES, "loki": {"labels": ["pod", "bogus"]}}, "sinks.s.loki.labels[1]"),
        ({**ES, "loki": {"metadata": "xml"}}, "sinks.s.loki.metadata"),
        ({**ES, "http": {"format": "csv"}}, "sinks.s.http.format"),
        ({**ES, "bogus": 1}, "sinks.s.bogus"),
        ({**ES, "tls": {"bogus": 1}}, "sinks.s.tls.bogus"),
    ],
)
def test_bad_sink_names_the_key(sink: dict[str, Any], key: str) -> None:
    assert key in error({"sinks": {"s": sink}})


@pytest.mark.parametrize("name", ["", "ES", "a b", "-x", "x" * 64, "é"])
def test_bad_sink_names(name: str) -> None:
    assert "sinks." in error({"sinks": {name: ES}})


def test_no_sink_and_two_stdout_sinks_are_rejected() -> None:
    assert "sinks" in error({"sinks": {}})
    assert "stdout" in error({"sinks": {"a": {}, "b": {"kind": "stdout"}}})


def test_index_date_pattern_allowed_without_data_stream() -> None:
    sink = {**ES, "elasticsearch": {"index": "logs-%Y.%m.%d", "data_stream": False}}
    config_from_dict({"sinks": {"es": sink}}, {})


def test_sink_env_overrides_nested_keys() -> None:
    env = {
        "PODTAP_SINKS__ES__URL": "http://127.0.0.1:9200",
        "PODTAP_SINKS__ES__AUTH__USERNAME": "elastic",
        "PODTAP_SINKS__ES__AUTH__PASSWORD_ENV": "ES_PASSWORD",
        "PODTAP_SINKS__ES__BATCH__MAX_AGE_S": "2.5",
        "PODTAP_SINKS__ES__GZIP": "false",
    }
    cfg = config_from_dict({"sinks": {"es": ES}}, env)
    es = cfg.sinks["es"]
    assert es.url == "http://127.0.0.1:9200"
    assert (es.auth.username, es.auth.password_env) == ("elastic", "ES_PASSWORD")
    assert es.batch.max_age_s == 2.5
    assert es.gzip is False
    assert es.kind == "elasticsearch"  # the file's keys stay


def test_sink_env_can_add_a_sink() -> None:
    env = {"PODTAP_SINKS__L__KIND": "loki", "PODTAP_SINKS__L__URL": "http://l:3100"}
    assert config_from_dict({}, env).sinks["l"].kind == "loki"


@pytest.mark.parametrize("var", ["PODTAP_SINKS__ES", "PODTAP_SINKS__", "PODTAP_SINKS__ES____URL"])
def test_malformed_sink_variable(var: str) -> None:
    assert var in error({}, {var: "x"})


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("PODTAP_KUBE_POLL_INTERVAL_S", "soon", "kube.poll_interval_s"),
        ("PODTAP_LINES_MAX_LINE", "0", "lines.max_line"),
        ("PODTAP_SINKS__ES__GZIP_LEVEL", "11", "sinks.es.gzip_level"),
        ("PODTAP_CAPTURE_BOGUS", "1", "capture.bogus"),
    ],
)
def test_env_errors_name_the_variable(var: str, value: str, key: str) -> None:
    message = error({"sinks": {"es": ES}}, {var: value})
    assert message.startswith(var)
    assert key in message


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "Infinity", "1e400"])
def test_non_finite_numbers_are_rejected(text: str) -> None:
    assert "finite" in error({}, {"PODTAP_KUBE_POLL_INTERVAL_S": text})
    assert "finite" in error({"kube": {"timeout_s": float(text)}})


def test_misspelled_section_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="podtap.config"):
        assert config_from_dict({}, {"PODTAP_KUEB_RETRIES": "1"}) == Config()
    assert "PODTAP_KUEB_RETRIES" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="podtap.config"):
        config_from_dict({}, {"PODTAP_LOG_LEVEL": "debug"})
    assert caplog.text == ""


def test_json_schema_is_valid_and_matches_the_loader() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = {
        "capture": {"max_write": 8192},
        "sinks": {"es": {**ES, "tls": {"ca_file": "/ca"}, "headers": {"X-A": "b"}}},
        "agent": {"log_format": "text"},
    }
    assert list(validator.iter_errors(good)) == []
    config_from_dict(good, {})
    for bad in (
        {"bogus": 1},
        {"capture": {"max_write": "big"}},
        {"sinks": {"es": {"kind": "kafka"}}},
        {"sinks": {"es": {**ES, "tls": {"verify": True}}}},
        {"sinks": {"Bad Name": ES}},
        {"agent": {"log_format": "xml"}},
        {"kube": {"cgroup_roots": [1]}},
    ):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(ConfigError):
            config_from_dict(bad, {})


def test_json_schema_defaults_are_the_dataclass_defaults() -> None:
    props = json_schema()["properties"]
    assert props["capture"]["properties"]["max_write"]["default"] == Config().capture.max_write
    sink = props["sinks"]["additionalProperties"]["properties"]
    assert sink["kind"]["enum"] == list(SINK_KINDS)
    assert sink["batch"]["properties"]["max_age_s"]["default"] == 1.0
    assert props["sinks"]["default"]["stdout"]["kind"] == "stdout"


def test_effective_config_masks_secrets() -> None:
    cfg = config_from_dict(
        {
            "sinks": {
                "h": {
                    "kind": "http",
                    "url": "https://user:hunter2@logs.example/x",
                    "headers": {"X-Api-Key": "s3cret"},
                }
            }
        },
        {},
    )
    text = json.dumps(effective_config(cfg))
    assert "hunter2" not in text and "s3cret" not in text
    assert "https://user:***@logs.example/x" in text


def test_dry_run_prints_the_effective_config(tmp_path: Path) -> None:
    path = tmp_path / "podtap.yaml"
    path.write_text(yaml.safe_dump({"sinks": {"es": {**ES, "headers": {"X-K": "s3cret"}}}}))
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--dry-run", "-c", str(path)],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    printed = yaml.safe_load(run.stdout)
    assert printed["sinks"]["es"]["url"] == ES["url"]
    assert "s3cret" not in run.stdout


def test_dry_run_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "podtap.yaml"
    path.write_text("sinks: {es: {kind: elasticsearch}}\n")
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--dry-run", "-c", str(path)],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2
    assert "sinks.es.url" in run.stderr


@pytest.mark.parametrize(
    "loki",
    [
        {"labels": []},
        {"labels": ["app", "image"]},  # a pod may have neither: streams without labels
        {"pod_labels": [f"l{i}" for i in range(11)]},  # 5 + 11 > 15
    ],
)
def test_loki_label_sets_loki_would_refuse(loki: dict[str, Any]) -> None:
    sink = {"kind": "loki", "url": "http://loki:3100", "loki": loki}
    assert "sinks.l.loki.labels" in error({"sinks": {"l": sink}})


@pytest.mark.parametrize(("ring", "chunk"), [(4096, 4096), (8192, 8192), (16384, 16384)])
def test_ring_smaller_than_one_record_is_rejected(ring: int, chunk: int) -> None:
    message = error({"capture": {"ring_bytes": ring, "chunk": chunk}})
    assert message.startswith("capture.ring_bytes")
    config_from_dict({"capture": {"ring_bytes": 2 * ring, "chunk": chunk}}, {})


def test_pending_line_bytes_at_least_one_line() -> None:
    assert "lines.max_pending_bytes" in error({"lines": {"max_line": 4096,
                                                         "max_pending_bytes": 4095}})


def test_invalid_utf8_choices() -> None:
    assert config_from_dict({"records": {"invalid_utf8": "base64"}}, {}).records.invalid_utf8 \
        == "base64"
    assert "records.invalid_utf8" in error({"records": {"invalid_utf8": "drop"}})


def test_agent_pod_selector_is_a_label_selector() -> None:
    assert Config().kube.agent_pod_selector == "app.kubernetes.io/name=podtap"
    assert "kube.agent_pod_selector" in error({"kube": {"agent_pod_selector": "a in (b"}})
