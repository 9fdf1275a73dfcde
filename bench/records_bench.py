"""Lines per second of agent.records against a naive per-line ``orjson.dumps(dict)``.

Run: .venv/bin/python bench/records_bench.py [--lines N]
Messages are 100 bytes; timestamps advance 10 µs per line, so about 100 lines share each
second, as on a busy node. Each variant runs in several rounds, interleaved with the others
so that they share the machine's noise; the best round is reported.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from agent.kube.model import ContainerMeta
from agent.records import (
    ContainerEncoder,
    RecordFormat,
    encode_tap_line,
    format_rfc3339_ns,
    metadata_fields,
)

META = ContainerMeta(
    namespace="shop",
    pod_name="web-7d9f8c6b5-x2kqz",
    pod_uid="0f1e2d3c-aaaa-bbbb-cccc-123456789abc",
    container_name="app",
    container_id="4b8e2f1c" * 8,
    runtime="containerd",
    image="registry.example.com/team/web:1.4.2",
    host="node-3.example.internal",
    qos_class="burstable",
    labels={
        "app.kubernetes.io/name": "web",
        "app.kubernetes.io/part-of": "shop",
        "pod-template-hash": "7d9f8c6b5",
        "tier": "front",
    },
    owner_kind="ReplicaSet",
    owner_name="web-7d9f8c6b5",
)
MESSAGE = (b'GET /api/v1/items?page=3 200 12ms user=42 agent="curl/8.5" \xe2\x9c\x93 ' * 2)[:100]
START_NS = 1_795_315_894_000_000_000
STEP_NS = 10_000


def lines_per_second(encode: Callable[[int], bytes], count: int) -> float:
    encode(START_NS)  # warm caches
    begin = time.perf_counter()
    for i in range(count):
        encode(START_NS + i * STEP_NS)
    return count / (time.perf_counter() - begin)


def best_rates(
    variants: dict[str, Callable[[int], bytes]], count: int, rounds: int
) -> dict[str, float]:
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, encode in variants.items():
            best[name] = max(best[name], lines_per_second(encode, count // rounds))
    return best


def naive_metadata_line(metadata: dict[str, object]) -> Callable[[int], bytes]:
    def encode(time_ns: int) -> bytes:
        record = {
            "time": format_rfc3339_ns(time_ns),
            "stream": "stdout",
            "message": MESSAGE.decode("utf-8", "replace"),
            "partial": False,
        }
        record.update(metadata)
        return orjson.dumps(record)

    return encode


def naive_tap_line(time_ns: int) -> bytes:
    return orjson.dumps(
        {
            "time": format_rfc3339_ns(time_ns),
            "stream": "stdout",
            "pid": 4242,
            "comm": b"web".decode("utf-8", "replace"),
            "cgroup_id": 123456789,
            "message": MESSAGE.decode("utf-8", "replace"),
            "partial": False,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    count = parser.parse_args().lines

    fmt = RecordFormat()
    encoder = ContainerEncoder(META, fmt)
    sample = encoder.encode(START_NS, 1, MESSAGE, False)
    naive = naive_metadata_line(metadata_fields(META, fmt))
    assert orjson.loads(sample) == orjson.loads(naive(START_NS))

    variants: dict[str, Callable[[int], bytes]] = {
        "fluentbit schema, ContainerEncoder": lambda t: encoder.encode(t, 1, MESSAGE, False),
        "fluentbit schema, naive orjson.dumps(dict)": naive,
        "tap, encode_tap_line": lambda t: encode_tap_line(
            t, 1, 4242, b"web", 123456789, MESSAGE, False
        ),
        "tap, naive orjson.dumps(dict)": naive_tap_line,
    }
    results = best_rates(variants, count, rounds=5)
    print(f"{len(MESSAGE)}-byte messages, {len(sample)}-byte records, best of 5 rounds")
    for name, rate in results.items():
        print(f"{name:45s} {rate / 1e6:6.2f} M lines/s  {1e9 / rate:6.0f} ns/line")


if __name__ == "__main__":
    main()
