"""bench/profile.py's sorting of py-spy samples into the data path's stages."""

from __future__ import annotations

import pytest

from bench.profile import STAGES, stage_of, stage_shares

LOOP = ["_run_module_as_main (<frozen runpy>:198)", "BaseEventLoop.run_forever "
        "(asyncio/base_events.py:607)", "Handle._run (asyncio/events.py:80)"]


@pytest.mark.parametrize(("inner", "stage"), [
    (["AgentPipeline._consume (agent/pipeline.py:181)", "decode (agent/capture/events.py:158)"],
     "decode"),
    (["AgentPipeline._consume (agent/pipeline.py:181)", "LineStage.process (agent/lines.py:521)",
      "LineAssembler.process (agent/lines.py:153)"], "lines"),
    (["AgentPipeline._ship (agent/pipeline.py:172)", "Enricher.process (agent/enrich.py:86)"],
     "enrich"),
    (["BatchingSink.put (agent/sinks/runner.py:162)",
      "LokiEncoder.encode (agent/sinks/loki.py:161)"], "encode records"),
    (["BatchingSink.put (agent/sinks/runner.py:162)",
      "ContainerEncoder.encode (agent/records.py:300)"], "encode records"),
    (["BatchingSink.put (agent/sinks/runner.py:162)"], "batching, buffers"),
    (["BatchingSink._send (agent/sinks/runner.py:276)", "LokiCodec.body (agent/sinks/loki.py:219)"],
     "request body"),
    (["BatchingSink._send (agent/sinks/runner.py:276)",
      "LokiCodec._streams (agent/sinks/loki.py:280)"], "request body"),
    (["BatchingSink._send (agent/sinks/runner.py:276)",
      "ElasticsearchCodec.body (agent/sinks/elasticsearch.py:191)"], "request body"),
    (["HttpTransport._request (agent/sinks/http.py:335)",
      "ClientSession._request (aiohttp/client.py:900)"], "HTTP client (aiohttp)"),
    (["_worker (concurrent/futures/thread.py:83)", "gzip_bytes (agent/sinks/http.py:58)"], "gzip"),
    (["TelemetryServer.metrics (agent/telemetry.py:430)"], "telemetry"),
    (["Discovery.poll (agent/kube/discovery.py:281)"], "kubelet discovery"),
])
def test_a_sample_goes_to_the_stage_of_its_innermost_agent_frame(
    inner: list[str], stage: str
) -> None:
    assert stage_of(LOOP + inner) == stage


def test_waking_the_loop_from_the_drain_thread_is_wake_up_cost_not_drain() -> None:
    frames = ["Thread._bootstrap (threading.py:995)", "Drainer.run (agent/capture/events.py:234)",
              "Drainer.drain_once (agent/capture/events.py:218)",
              "CaptureSource.start.<locals>.deliver (agent/capture/source.py:38)",
              "BaseEventLoop.call_soon_threadsafe (asyncio/base_events.py:812)",
              "BaseSelectorEventLoop._write_to_self (asyncio/selector_events.py:139)"]
    assert stage_of(frames) == "event loop and wake-ups"
    assert stage_of(frames[:3]) == "ring drain"


def test_frames_of_no_stage_are_other() -> None:
    assert stage_of(["<module> (somewhere/else.py:1)", "f (x.py:2)"]) == "other"
    assert stage_of([]) == "other"


def test_the_stage_names_are_unique() -> None:
    names = [name for name, _ in STAGES]
    assert len(names) == len(set(names))


def test_raw_output_becomes_shares_weighted_by_the_counts() -> None:
    raw = "\n".join([
        ";".join(LOOP + ["decode (agent/capture/events.py:158)"]) + " 30",
        ";".join(LOOP + ["Enricher.process (agent/enrich.py:86)"]) + " 10",
        ";".join(LOOP) + " 10",
        "",
        "garbage without a count",
    ])
    shares, samples = stage_shares(raw)
    assert samples == 50
    assert shares == {"decode": 0.6, "enrich": 0.2, "event loop and wake-ups": 0.2}
    assert list(shares) == ["decode", "enrich", "event loop and wake-ups"]  # largest first


def test_no_samples_is_no_shares() -> None:
    assert stage_shares("") == ({}, 0)
