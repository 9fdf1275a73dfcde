"""Tests of the lifecycle shared by tap and run, and of podtap run's start-up errors."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import KubeConfig
from agent.lifecycle import run_until_stopped
from agent.pipeline import node_name

REPO = Path(__file__).resolve().parents[2]


class FakeSource:
    """Stands in for CaptureSource: stop() ends the consumer's stream."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    def stop(self) -> None:
        self.stopped.set()


async def consume(source: FakeSource) -> None:
    await source.stopped.wait()


def run(helpers: dict[str, Any], stop_after: float | None = None) -> tuple[list[str], bool]:
    async def main() -> tuple[list[str], bool]:
        source, stop = FakeSource(), asyncio.Event()
        if stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, stop.set)
        failed = await run_until_stopped(source, stop, consume(source), helpers)  # type: ignore[arg-type]
        return failed, source.stopped.is_set()

    return asyncio.run(main())


async def crash() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("discovery broke")


async def forever() -> None:
    await asyncio.Event().wait()


def test_a_crashed_task_stops_everything_and_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        failed, stopped = run({"agent-discovery": crash(), "agent-housekeeping": forever()})
    assert failed == ["agent-discovery"]
    assert stopped  # the capture was stopped, the consumer finished
    assert "agent-discovery failed: discovery broke" in caplog.text


def test_a_stop_cancels_the_helpers_without_failure() -> None:
    failed, stopped = run({"a": forever(), "b": forever()}, stop_after=0.01)
    assert failed == [] and stopped


def test_node_name_falls_back_to_the_host_name_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    with caplog.at_level(logging.WARNING):
        name = node_name(KubeConfig())
    assert name and "NODE_NAME" in caplog.text
    caplog.clear()
    monkeypatch.setenv("NODE_NAME", "node-7")
    assert node_name(KubeConfig()) == "node-7"
    assert node_name(KubeConfig(node_name="cfg")) == "cfg"
    assert caplog.text == ""


def podtap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("NODE_IP", "NODE_NAME")}
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**base, **(env or {})})


def test_missing_node_ip_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "podtap.yaml"
    config.write_text("telemetry: {enabled: false}\n")
    proc = podtap("run", "-c", str(config))
    assert proc.returncode == 1
    assert "NODE_IP is not set" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("level", ["verbose", "", "5"])
def test_bad_log_level_exits_2(level: str) -> None:
    proc = podtap("--log-level", level, "version")
    assert proc.returncode == 2
    assert "log level" in proc.stderr and "Traceback" not in proc.stderr
