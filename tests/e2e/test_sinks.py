"""`podtap run` shipping to log backends end to end: the simulated node (real containerd
containers, the real BPF program, the loopback kubelet) and, as backends, the noida-db
Elasticsearch emulator and loopback servers written from the Loki, Elasticsearch `_bulk`
and OTLP/HTTP documentation (simnode/{loki,otlp,esbulk}.py).

The ground truth of each container is what the runtime relayed from its pipes. Faults:
a sink down for 30 s (memory, then disk buffer), a 429 storm with Retry-After, per-item
bulk errors, a slow sink, SIGKILL of the agent with data on disk, a full disk buffer,
bad configuration, unreachable URLs and untrusted certificates.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from agent.sinks.buffer import DB_NAME
from simnode.agent import REPO, AgentRun, agent_config
from simnode.esbulk import EsBulkServer
from simnode.loki import FakeLoki
from simnode.node import SimContainer, SimContainerSpec, SimNode
from simnode.noida import NoidaElasticsearch, NoidaUnavailable
from simnode.otlp import FakeOtlpReceiver
from tests.kernel import unavailable

pytestmark = pytest.mark.kernel

FAST = {"batch": {"max_age_s": 0.2}, "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0}}


@pytest.fixture
def loki() -> Iterator[FakeLoki]:
    with FakeLoki() as server:
        yield server


@pytest.fixture
def otlp() -> Iterator[FakeOtlpReceiver]:
    with FakeOtlpReceiver() as server:
        yield server


def start_noida(port: int = 0) -> NoidaElasticsearch:
    try:
        return NoidaElasticsearch(port=port).start()
    except NoidaUnavailable as e:
        unavailable(f"the Elasticsearch emulator cannot run: {e}")


def sink(kind: str, url: str, **more: Any) -> dict[str, Any]:
    return {"kind": kind, "url": url, **FAST, **more}


def lines_script(n: int, word: str, stream: str = "", width: int = 0) -> str:
    """n numbered lines; `width` pads each to about that many bytes."""
    redirect = " >&2" if stream == "err" else ""
    pad = "x" * max(0, width - len(word) - 8)
    return f'i=0; while [ $i -lt {n} ]; do echo "{word} $i {pad}"{redirect}; i=$((i+1)); done; '


def truth(c: SimContainer) -> tuple[list[str], list[str]]:
    out, err = c.output()
    return out.decode().splitlines(), err.decode().splitlines()


def loki_lines(loki: FakeLoki, c: SimContainer, stream: str) -> list[str]:
    return [
        e.line
        for e in loki.entries()
        if e.labels.get("container") == c.name  # container names are unique in a test
        and e.labels.get("stream") == stream
    ]


def otlp_lines(otlp: FakeOtlpReceiver, c: SimContainer, stream: str) -> list[str]:
    return [
        r.body
        for r in otlp.records()
        if r.resource.get("container.id") == c.id and r.attributes.get("log.iostream") == stream
    ]


def es_docs(es: NoidaElasticsearch) -> list[dict[str, Any]]:
    from elasticsearch import Elasticsearch

    client = Elasticsearch(es.url, request_timeout=30)
    try:
        client.indices.refresh(index="logs-podtap-default", ignore_unavailable=True)
        found = client.search(index="logs-podtap-default", size=10000,
                              query={"match_all": {}}, ignore_unavailable=True)
        return [hit["_source"] for hit in found["hits"]["hits"]]
    finally:
        client.close()


def es_lines(docs: list[dict[str, Any]], c: SimContainer, stream: str) -> Counter[str]:
    return Counter(
        d["message"] for d in docs
        if d["kubernetes"]["docker_id"] == c.id and d["stream"] == stream
    )


def wait(what: Callable[[], bool], agent: AgentRun, timeout: float, why: str) -> None:
    agent.wait_for(what, timeout=timeout, why=why)


def test_every_line_reaches_elasticsearch_loki_and_otlp(
    node: SimNode, loki: FakeLoki, otlp: FakeOtlpReceiver, tmp_path: Path
) -> None:
    es = start_noida()
    try:
        sinks = {
            "es": sink("elasticsearch", es.url, elasticsearch={"document_id": True}),
            "loki": sink("loki", loki.url),
            "otlp": sink("otlp", otlp.url, gzip=False),
        }
        agent = AgentRun(node, tmp_path, sinks=sinks)
        pod = node.run_pod("shop", "web-1", [
            SimContainerSpec("web", lines_script(300, "GET /item")
                             + lines_script(40, "warn", "err")),
            SimContainerSpec("side", lines_script(120, "sync")),
        ])
        pod.wait()
        containers = [pod.container("web"), pod.container("side")]
        expected = {c.name: truth(c) for c in containers}
        total = sum(len(o) + len(e) for o, e in expected.values())

        def arrived() -> bool:
            return all(
                loki_lines(loki, c, "stdout") == expected[c.name][0]
                and loki_lines(loki, c, "stderr") == expected[c.name][1]
                and otlp_lines(otlp, c, "stdout") == expected[c.name][0]
                and otlp_lines(otlp, c, "stderr") == expected[c.name][1]
                for c in containers
            ) and len(es_docs(es)) == total

        wait(arrived, agent, 90, "every line in the three backends")
        docs = es_docs(es)
        for c in containers:
            out, err = expected[c.name]
            assert es_lines(docs, c, "stdout") == Counter(out)
            assert es_lines(docs, c, "stderr") == Counter(err)
        doc = next(d for d in docs if d["kubernetes"]["container_name"] == "web")
        assert doc["kubernetes"]["pod_name"] == "web-1"
        assert doc["kubernetes"]["namespace_name"] == "shop"
        assert doc["@timestamp"].endswith("Z")
        entry = next(e for e in loki.entries() if e.labels.get("container") == "web")
        assert entry.labels["namespace"] == "shop" and entry.labels["node"] == node.node_name
        assert entry.metadata["pod_uid"] == pod.uid
        record = next(r for r in otlp.records() if r.resource["k8s.container.name"] == "side")
        assert record.resource["k8s.pod.name"] == "web-1"
        assert record.resource["k8s.namespace.name"] == "shop"
        for name in ("es", "loki", "otlp"):
            assert agent.metric("podtap_sink_sent_records_total", sink=name) == total
            assert agent.metric("podtap_sink_dropped_records_total", sink=name) == 0
        assert agent.metric("podtap_ringbuf_dropped_records_total") == 0
        stats = agent.stop()
        assert stats["sink_loki"]["records_sent"] == total
    finally:
        es.stop()


def test_sink_down_30s_spills_to_disk_and_delivers_everything_in_order(
    node: SimNode, loki: FakeLoki, tmp_path: Path
) -> None:
    """Memory buffer first, then the disk buffer; once Loki is back, everything arrives,
    in order per container stream, and nothing was dropped."""
    buffer = {"memory_bytes": 1 << 20, "disk_dir": str(tmp_path / "buffer")}
    agent = AgentRun(node, tmp_path, sinks={"loki": sink("loki", loki.url, buffer=buffer)})
    loki.down()
    down_at = time.monotonic()
    before = loki.request_count()  # the agent's preflight GET at start
    pod = node.run_pod("shop", "burst", [
        SimContainerSpec("a", lines_script(6000, "alpha", width=100)),
        SimContainerSpec("b", lines_script(3000, "beta", width=100)
                         + lines_script(500, "oops", "err", width=100)),
    ])
    pod.wait(120)
    wait(lambda: agent.metric("podtap_sink_buffered_disk_bytes", sink="loki") > 0, agent, 90,
         "batches spilled to the disk buffer")
    wait(lambda: time.monotonic() - down_at >= 30, agent, 60, "30 s of outage")
    assert loki.request_count() == before
    loki.up()
    containers = [pod.container("a"), pod.container("b")]
    expected = {c.name: truth(c) for c in containers}
    wait(
        lambda: all(loki_lines(loki, c, "stdout") == expected[c.name][0]
                    and loki_lines(loki, c, "stderr") == expected[c.name][1]
                    for c in containers),
        agent, 120, "every line once Loki is back",
    )
    assert agent.metric("podtap_sink_dropped_records_total", sink="loki") == 0
    assert agent.metric("podtap_sink_failures_total", sink="loki", status_class="transport") > 0
    wait(lambda: agent.metric("podtap_sink_buffered_disk_bytes", sink="loki") == 0, agent, 60,
         "the disk buffer emptied")
    agent.stop()


def test_429_storm_with_retry_after_is_honoured(
    node: SimNode, loki: FakeLoki, tmp_path: Path
) -> None:
    agent = AgentRun(node, tmp_path, sinks={"loki": sink("loki", loki.url)})
    before = loki.request_count()  # the agent's preflight GET at start
    loki.fail_next(5, 429, retry_after="1")
    pod = node.run_pod("shop", "storm", [SimContainerSpec("c", lines_script(200, "req"))])
    pod.wait()
    c = pod.container("c")
    out, _ = truth(c)
    wait(lambda: loki_lines(loki, c, "stdout") == out, agent, 90, "every line after the storm")
    pushes = loki.requests[before:]
    statuses = [r.status for r in pushes]
    assert statuses[:5] == [429] * 5 and 204 in statuses
    assert agent.metric("podtap_sink_failures_total", sink="loki", status_class="429") == 5
    assert agent.metric("podtap_sink_retries_total", sink="loki") >= 5
    # Retry-After: 1 (seconds) was waited for between the 429s; the backoff alone
    # (initial 0.1 s) would have retried five times within about 3 s.
    times = [r.time for r in pushes[:6]]
    assert all(b - a >= 0.9 for a, b in zip(times, times[1:], strict=False)), times
    agent.stop()


def test_bulk_item_errors_are_dead_lettered_and_the_rest_delivered(
    node: SimNode, tmp_path: Path
) -> None:
    with EsBulkServer() as es:
        es.item_plan["poison"] = [400] * 10
        es.item_plan["flaky"] = [503]
        dead = tmp_path / "dead"
        agent = AgentRun(node, tmp_path, sinks={
            "es": sink("elasticsearch", es.url, dead_letter_dir=str(dead)),
        })
        script = lines_script(50, "fine") + 'echo "poison 1"; echo "flaky 1"; ' + \
            lines_script(50, "after") + 'echo "poison 2"; '
        pod = node.run_pod("shop", "bulk", [SimContainerSpec("c", script)])
        pod.wait()
        out, _ = truth(pod.container("c"))
        good = [line for line in out if "poison" not in line]

        def stored() -> list[str]:
            return sorted(d["message"] for d in es.sources("logs-podtap-default"))

        wait(lambda: stored() == sorted(good), agent, 90, "the good lines in _bulk")
        wait(lambda: agent.metric("podtap_sink_dead_letter_records_total", sink="es") == 2,
             agent, 60, "two dead letters")
        letters = [orjson.loads(line) for f in sorted(dead.rglob("*")) if f.is_file()
                   for line in f.read_bytes().splitlines()]
        assert sorted(orjson.loads(x["item"].split("\n")[1])["message"] for x in letters) == [
            "poison 1", "poison 2"]
        assert all("400" in x["reason"] or "mapper" in x["reason"] for x in letters), letters
        assert agent.metric("podtap_sink_retries_total", sink="es") >= 1  # the 503 item
        agent.stop()


def test_slow_sink_stalls_neither_capture_nor_the_other_sinks(
    node: SimNode, loki: FakeLoki, otlp: FakeOtlpReceiver, tmp_path: Path
) -> None:
    otlp.delay_s = 4.0
    agent = AgentRun(node, tmp_path, sinks={
        "loki": sink("loki", loki.url),
        "otlp": sink("otlp", otlp.url, max_in_flight=1),
    })
    pod = node.run_pod("shop", "slow", [SimContainerSpec("c", lines_script(3000, "tick"))])
    pod.wait()
    c = pod.container("c")
    out, _ = truth(c)
    wait(lambda: loki_lines(loki, c, "stdout") == out, agent, 60, "Loki keeping up")
    assert len(otlp_lines(otlp, c, "stdout")) < len(out)  # still on its way
    assert agent.metric("podtap_ringbuf_dropped_records_total") == 0
    otlp.delay_s = 0.0
    wait(lambda: otlp_lines(otlp, c, "stdout") == out, agent, 120, "the slow sink catching up")
    agent.stop()


def disk_records(buffer_dir: Path, sink_name: str) -> int:
    path = buffer_dir / sink_name / DB_NAME
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        (n,) = db.execute("SELECT coalesce(sum(records), 0) FROM batches").fetchone()
    return int(n)


def test_sigkill_with_data_on_disk_then_restart_delivers_all_once(
    node: SimNode, tmp_path: Path
) -> None:
    """Mode `always`: every batch is on disk before it is sent. SIGKILL, restart: the
    new agent replays the disk buffer; deterministic ids make a resend harmless."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    buffer_dir = tmp_path / "buffer"
    sinks = {"es": sink("elasticsearch", url, elasticsearch={"document_id": True},
                        buffer={"mode": "always", "disk_dir": str(buffer_dir)})}
    agent = AgentRun(node, tmp_path, sinks=sinks)
    pod = node.run_pod("shop", "killed", [SimContainerSpec("c", lines_script(500, "keep"))])
    pod.wait()
    out, _ = truth(pod.container("c"))
    wait(lambda: disk_records(buffer_dir, "es") == len(out), agent, 60,
         "every line in the disk buffer")
    agent.kill()
    es = start_noida(port)
    try:
        again = AgentRun(node, tmp_path, sinks=sinks)
        wait(lambda: len(es_docs(es)) >= len(out), again, 90, "the replay")
        wait(lambda: disk_records(buffer_dir, "es") == 0, again, 60, "the disk buffer emptied")
        docs = es_docs(es)
        assert Counter(d["message"] for d in docs) == Counter(out)  # all, none twice
        again.stop()
    finally:
        es.stop()


def test_disk_buffer_full_drops_the_newest_and_counts_them(
    node: SimNode, loki: FakeLoki, tmp_path: Path
) -> None:
    buffer = {"memory_bytes": 1 << 20, "disk_dir": str(tmp_path / "buffer"),
              "disk_bytes": 1 << 20}
    agent = AgentRun(node, tmp_path, sinks={"loki": sink("loki", loki.url, buffer=buffer)})
    loki.down()
    pod = node.run_pod("shop", "flood", [
        SimContainerSpec("c", lines_script(20000, "flood", width=120))])
    pod.wait(180)
    wait(lambda: agent.metric("podtap_sink_dropped_records_total", sink="loki") > 0, agent, 120,
         "drops once memory and disk are full")
    dropped = agent.metric("podtap_sink_dropped_records_total", sink="loki")
    loki.up()
    c = pod.container("c")
    out, _ = truth(c)
    wait(lambda: agent.metric("podtap_sink_sent_records_total", sink="loki") + dropped
         >= len(out), agent, 120, "what was kept delivered")
    got = loki_lines(loki, c, "stdout")
    assert len(got) + dropped == len(out)
    # The newest were dropped, never the oldest: every line up to the first drop arrived,
    # at least what 1 MiB of memory and 1 MiB of disk hold (~500 bytes an entry here);
    # lines captured after Loki came back fit again. Nothing is reordered.
    first_missing = next(i for i, (a, b) in enumerate(zip(got, out, strict=False)) if a != b)
    assert first_missing >= 2000
    position = {line: i for i, line in enumerate(out)}
    indices = [position[line] for line in got]
    assert indices == sorted(indices)
    assert any("dropped" in line for line in agent.log), agent.logs()
    agent.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_dry(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize(
    ("sinks", "says"),
    [
        ({"es": {"kind": "elasticsearch"}}, "sinks.es.url"),
        ({"es": {"kind": "elasticsearch", "url": "http://x", "auth": {
            "username": "u", "password_file": "/nonexistent/pw"}}}, "password_file"),
        ({"l": {"kind": "loki", "url": "https://x", "tls": {"ca_file": "/nonexistent/ca"}}},
         "tls.ca_file"),
    ],
)
def test_bad_sink_configuration_is_a_clear_error_at_start(
    node: SimNode, tmp_path: Path, sinks: dict[str, Any], says: str
) -> None:
    run = run_dry(tmp_path, agent_config(node, sinks=sinks))
    assert run.returncode in (1, 2), run.stderr
    assert says in run.stderr
    assert "Traceback" not in run.stderr


def test_unreachable_url_and_untrusted_certificate_are_named_at_start(
    node: SimNode, tmp_path: Path
) -> None:
    with FakeLoki(tls=True) as tls_loki:
        sinks = {
            "down": sink("loki", f"http://127.0.0.1:{free_port()}"),
            "badcert": sink("loki", tls_loki.url),  # its CA is not trusted
        }
        agent = AgentRun(node, tmp_path, sinks=sinks)
        wait(lambda: any("sink down:" in line and "cannot connect" in line
                         for line in agent.log), agent, 60, "the unreachable sink named")
        wait(lambda: any("sink badcert:" in line and "certificate verify failed" in line
                         for line in agent.log), agent, 60, "the bad certificate named")
        assert agent.alive()  # it buffers: a backend may come back
        agent.stop()
