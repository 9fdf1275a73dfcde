"""The benchmarks' latency receiver (bench/latency_server.py) as its own process: real
`_bulk` and Loki push requests with stamped lines, counted and timed through its control
endpoints."""

from __future__ import annotations

import gzip
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from bench.latency_server import WARMUP_ID, LatencyReceiver, latency_receiver

AGE_NS = 2_000_000_000  # every stamped line claims to be written this long ago


def stamped(writer: int, seq: int, written_ns: int) -> str:
    return f"w{writer} s{seq} t{written_ns} " + "x" * 60


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def bulk(receiver: LatencyReceiver, lines: list[str], gzipped: bool = True) -> tuple[int, bytes]:
    body = "".join('{"create":{}}\n' + json.dumps({"message": line, "kubernetes": {
        "pod_name": "p", "namespace_name": "bench"}}) + "\n" for line in lines).encode()
    headers = {"Content-Type": "application/x-ndjson"}
    if gzipped:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    return post(receiver.url + "/logs-bench/_bulk", body, headers)


def push(receiver: LatencyReceiver, lines: list[str], gzipped: bool = True) -> tuple[int, bytes]:
    now = time.time_ns()
    doc = {"streams": [{"stream": {"namespace": "bench", "pod": "p"},
                        "values": [[str(now), line] for line in lines]}]}
    body = json.dumps(doc).encode()
    headers = {"Content-Type": "application/json"}
    if gzipped:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    return post(receiver.url + "/loki/api/v1/push", body, headers)


SENDERS = {"es": bulk, "loki": push}


@pytest.fixture(params=["es", "loki"])
def receiver(request: pytest.FixtureRequest) -> Iterator[LatencyReceiver]:
    with latency_receiver(request.param) as rx:
        yield rx


def test_runs_in_a_process_of_its_own(receiver: LatencyReceiver) -> None:
    assert receiver.pid != os.getpid()
    assert os.path.exists(f"/proc/{receiver.pid}")


def test_counts_unique_lines_warmups_and_duplicates(receiver: LatencyReceiver) -> None:
    send = SENDERS[receiver.kind]
    written = time.time_ns() - AGE_NS
    first = [stamped(w, s, written) for w in (0, 1) for s in range(50)]
    assert send(receiver, first)[0] in (200, 204)
    again = [stamped(0, s, written) for s in range(10)] + [stamped(WARMUP_ID, 0, written)]
    assert send(receiver, again, gzipped=False)[0] in (200, 204)

    assert receiver.unique() == 100
    assert receiver.warmups == 1
    summary = receiver.summary(expected=103)
    assert (summary["expected"], summary["received"], summary["lost"]) == (103, 100, 3)
    assert summary["duplicates"] == 10
    # write -> receipt: the stamp's age plus the trip, well under a generous bound
    for key in ("p50_s", "p99_s", "max_s"):
        assert AGE_NS / 1e9 <= summary[key] < AGE_NS / 1e9 + 60
    quantiles = summary["latency_quantiles_s"]
    assert len(quantiles) == 101 and quantiles == sorted(quantiles)


def test_reset_forgets_everything(receiver: LatencyReceiver) -> None:
    send = SENDERS[receiver.kind]
    written = time.time_ns()
    send(receiver, [stamped(3, s, written) for s in range(5)] + [stamped(WARMUP_ID, 0, written)])
    assert receiver.unique() == 5
    receiver.reset()
    assert (receiver.unique(), receiver.warmups) == (0, 0)
    summary = receiver.summary(expected=0)
    assert summary["received"] == 0 and summary["p99_s"] is None
    send(receiver, [stamped(3, 0, written)])  # seen before the reset: new again
    assert receiver.unique() == 1


def test_es_answers_bulk_items_and_refuses_what_elasticsearch_refuses() -> None:
    with latency_receiver("es") as rx:
        status, answer = bulk(rx, [stamped(0, s, time.time_ns()) for s in range(3)])
        assert status == 200
        doc = json.loads(answer)
        assert doc["errors"] is False
        assert [item["create"]["status"] for item in doc["items"]] == [201, 201, 201]
        status, _ = post(rx.url + "/logs/_bulk", b'{"create":{}}\n{"message":"x"}\n',
                         {"Content-Type": "text/plain"})
        assert status == 406
        status, _ = post(rx.url + "/logs/_bulk", b"not json\n",
                         {"Content-Type": "application/x-ndjson"})
        assert status == 400
        assert rx.unique() == 3


def test_loki_refuses_what_loki_refuses() -> None:
    with latency_receiver("loki") as rx:
        status, _ = post(rx.url + "/loki/api/v1/push", b'{"streams":[{"stream":{},'
                         b'"values":[["1","w0 s0 t1 "]]}]}', {"Content-Type": "application/json"})
        assert status == 400  # no label left: Loki refuses the stream
        status, _ = post(rx.url + "/loki/api/v1/push", b'{"streams":[{"stream":{"a":"b"},'
                         b'"values":[[1,"w0 s1 t1 "]]}]}', {"Content-Type": "application/json"})
        assert status == 400  # the timestamp is a number, not a string
        assert rx.unique() == 0


def test_stops_with_its_context() -> None:
    with latency_receiver("es") as rx:
        pid = rx.pid
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError), latency_receiver("kafka"):
        pass
