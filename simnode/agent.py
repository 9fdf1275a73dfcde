"""Run `podtap run` as a subprocess against a SimNode and collect what it ships."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from simnode.node import SimContainer, SimNode

REPO = Path(__file__).resolve().parents[2]


def agent_config(node: SimNode, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kube": {
            "kubelet_url": node.kubelet_url,
            "token_path": str(node.token_path),
            "ca_path": str(node.ca_path),
            "cgroup_roots": list(node.roots),
            "node_name": node.node_name,
            "poll_interval_s": 2.0,
            "timeout_s": 10.0,  # a loaded CI machine; fault tests set their own
            "retries": 1,
        },
        "telemetry": {"address": "127.0.0.1", "port": 0},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


class AgentRun:
    """A `podtap run` process: its records (parsed NDJSON) and its log lines."""

    running: list[AgentRun] = []  # killed by the e2e conftest if a test left one behind

    def __init__(self, node: SimNode, tmp: Path, **sections: dict[str, Any]) -> None:
        config = tmp / "podtap.yaml"
        config.write_text(yaml.safe_dump(agent_config(node, **sections)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._records: list[dict[str, Any]] = []
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()
        AgentRun.running.append(self)
        self.wait_log("capturing:", 60)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = orjson.loads(line)
            with self._lock:
                self._records.append(record)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.log.append(line.decode(errors="replace").rstrip("\n"))

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records)

    def of(self, container: SimContainer) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kubernetes"]["docker_id"] == container.id]

    def wait_for(self, what: Callable[[], bool], timeout: float = 60, why: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n" + self.logs())
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {why}:\n" + self.logs())

    def wait_log(self, text: str, timeout: float = 60) -> None:
        self.wait_for(lambda: any(text in line for line in list(self.log)), timeout, repr(text))

    def logs(self) -> str:
        with self._lock:
            return "\n".join(self.log[-60:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: what an OOM kill or a node problem does; nothing is flushed."""
        self.proc.kill()
        self.proc.wait(60)
        for t in self._threads:
            t.join(60)

    @property
    def telemetry_url(self) -> str:
        self.wait_for(lambda: bool(self.log_records("telemetry listening")), 60,
                      "the telemetry server")
        port = self.log_records("telemetry listening")[0]["port"]
        return f"http://127.0.0.1:{port}"

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{label="v",...}': value} (labels sorted as exposed)."""
        with urllib.request.urlopen(self.telemetry_url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return self.metrics().get(f"{name}{{{key}}}" if key else name, 0.0)

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM, wait, and return the final stats the agent logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        assert self.proc.returncode == 0, self.logs()
        stopped = self.log_records("stopped")
        if not stopped:
            raise AssertionError("no final stats in the agent's log:\n" + self.logs())
        return dict(stopped[-1]["counters"])

    def log_records(self, msg: str) -> list[dict[str, Any]]:
        """The agent's JSON log records with this message."""
        out = []
        for line in list(self.log):
            if line.startswith("{") and f'"msg":"{msg}"' in line:
                out.append(orjson.loads(line))
        return out


def joined(records: list[dict[str, Any]], stream: str) -> bytes:
    """The bytes the records of one stream stand for (message + newline unless partial)."""
    return "".join(
        r["message"] + ("" if r["partial"] else "\n") for r in records if r["stream"] == stream
    ).encode()
