"""The image run as the chart's DaemonSet runs it: the pod spec of the default render (args,
downward-API env, every volume mount, read-only root filesystem, privileged, host pids) turned
into a podman command, on the simulated node (real containerd containers, the loopback kubelet).
The agent's probes answer, and every line of a pod arrives on its stdout sink."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from simnode.node import SimContainerSpec, SimNode, simnode_unavailable_reason
from tests.deploy.chart import Rendered, rendered
from tests.image.podman import PODMAN, ULIMITS, image_under_test
from tests.kernel import unavailable

pytestmark = pytest.mark.kernel

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def image() -> str:
    return image_under_test()


@pytest.fixture
def node(image: str) -> Iterator[SimNode]:
    reason = simnode_unavailable_reason()
    if reason is not None:
        unavailable(f"the simulated node cannot run: {reason}")
    with SimNode() as sim:
        yield sim


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def podman_args_of_pod(r: Rendered, tmp: Path) -> list[str]:
    """The podman options that give the agent container what the pod spec gives it.

    hostPath volumes are the host's paths, except the two the agent writes (header cache,
    disk buffers), which go to temporary directories; the ConfigMap is a directory with its
    data; emptyDir is a tmpfs."""
    pod, agent = r.pod, r.agent
    assert pod["hostPID"] is True
    sc = agent["securityContext"]
    args = ["--pid", "host", "--cgroupns", "host", "--network", "host"]
    if sc.get("privileged"):
        args.append("--privileged")
    caps = sc.get("capabilities", {})
    args += [a for c in caps.get("drop", []) for a in ("--cap-drop", c)]
    args += [a for c in caps.get("add", []) for a in ("--cap-add", c)]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    # seccompProfile RuntimeDefault (the chart's pod default) is podman's default profile.
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    volumes = r.volumes()
    for mount in agent["volumeMounts"]:
        volume = volumes[mount["name"]]
        ro = ":ro" if mount.get("readOnly") else ""
        if "configMap" in volume:
            src = tmp / "configmap" / mount["name"]
            src.mkdir(parents=True)
            for key, text in r.one("ConfigMap")["data"].items():
                (src / key).write_text(text)
            args += ["-v", f"{src}:{mount['mountPath']}{ro}"]
        elif "emptyDir" in volume:
            args += ["--tmpfs", mount["mountPath"]]
        elif volume["hostPath"].get("type") == "DirectoryOrCreate":
            src = tmp / "host" / volume["hostPath"]["path"].strip("/")
            src.mkdir(parents=True)
            args += ["-v", f"{src}:{mount['mountPath']}{ro}"]
        else:
            args += ["-v", f"{volume['hostPath']['path']}:{mount['mountPath']}{ro}"]
    return args


def downward_env(r: Rendered, node: SimNode) -> dict[str, str]:
    fields = {"spec.nodeName": node.node_name, "status.hostIP": "127.0.0.1",
              "metadata.name": "podtap-x7k2p", "metadata.namespace": "podtap",
              "metadata.uid": "0b7e4f7c-2f4e-4c38-9a51-7d4c2b9b1a11"}
    env = {}
    for e in r.agent["env"]:
        env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


class PodRun:
    """The agent container: its stdout records and stderr log, read as they come."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.records: list[dict[str, Any]] = []
        self.log: list[str] = []
        self._threads = [threading.Thread(target=self._out, daemon=True),
                         threading.Thread(target=self._err, daemon=True)]
        for t in self._threads:
            t.start()

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(orjson.loads(line))

    def _err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace").rstrip("\n"))

    def wait_for(self, what: Any, timeout: float, why: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode}):\n{self.logs()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {why}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(self.log[-40:])

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # podman passes SIGTERM on to the agent
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return code


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def agent_pod_command(r: Rendered, node: SimNode, image: str, tmp: Path, port: int,
                      extra_env: dict[str, str] | None = None,
                      podman_opts: tuple[str, ...] = ()) -> list[str]:
    """`podman run` of the chart's agent container on the simulated node: its service
    account, downward-API variables, and what a user would set through the chart's `env`
    for a node like this one; telemetry on 127.0.0.1:`port`."""
    sa = tmp / "serviceaccount"
    sa.mkdir()
    shutil.copy(node.token_path, sa / "token")
    shutil.copy(node.ca_path, sa / "ca.crt")
    env = downward_env(r, node) | {
        "PODTAP_KUBE_KUBELET_URL": node.kubelet_url,
        "PODTAP_KUBE_CGROUP_ROOTS": ",".join(node.roots),
        "PODTAP_TELEMETRY_ADDRESS": "127.0.0.1",
        "PODTAP_TELEMETRY_PORT": str(port),
    } | (extra_env or {})
    return [*PODMAN, "run", "--rm", *podman_opts, *ULIMITS, *podman_args_of_pod(r, tmp),
            "-v", f"{sa}:{SERVICE_ACCOUNT}:ro",
            *(a for k, v in env.items() for a in ("-e", f"{k}={v}")),
            image, *r.agent["args"]]


@pytest.mark.parametrize("values_file", ["default", "capabilities"])
def test_the_charts_pod_runs_and_ships_every_line(image: str, node: SimNode, tmp_path: Path,
                                                  values_file: str) -> None:
    r = rendered(values_file)
    port = free_port()
    agent = PodRun(agent_pod_command(r, node, image, tmp_path, port,
                                     {"PODTAP_KUBE_POLL_INTERVAL_S": "2"}))
    try:
        base = f"http://127.0.0.1:{port}"
        agent.wait_for(lambda: http_status(base + "/healthz") == 200, 240, "/healthz")
        agent.wait_for(lambda: http_status(base + "/readyz") == 200, 120, "/readyz")
        lines = 500
        script = f'i=0; while [ $i -lt {lines} ]; do echo "line $i"; i=$((i+1)); done'
        pod = node.run_pod("shop", "web-1", [SimContainerSpec("web", script)])
        pod.wait()
        (c,) = pod.containers
        out, _ = c.output()

        def shipped() -> bytes:
            mine = [x for x in list(agent.records)
                    if x.get("kubernetes", {}).get("docker_id") == c.id]
            return "".join(x["message"] + "\n" for x in mine).encode()

        agent.wait_for(lambda: shipped() == out, 60, "the pod's lines on the stdout sink")
        assert len(out.splitlines()) == lines
        assert http_status(base + "/metrics") == 200
    finally:
        code = agent.stop()
    assert code == 0, agent.logs()
    with contextlib.suppress(StopIteration):
        next(x for x in agent.log if "Traceback" in x)
        raise AssertionError(agent.logs())
