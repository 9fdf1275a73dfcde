"""Rendering the chart in tests: the render script's own functions, Helm's real engine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
VALUES_DIR = Path(__file__).resolve().parent / "values"
VALUES_FILES = sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))
# The oldest and the newest Kubernetes the chart supports (Chart.yaml kubeVersion >= 1.25).
KUBE_VERSIONS = ("1.25.0", "1.37.0")


def render_module() -> ModuleType:
    """scripts/render-manifests.py, imported (its name has a dash)."""
    name = "podtap_render_manifests"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "render-manifests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def values(name: str) -> dict[str, Any]:
    data = yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text())
    return data or {}


def render_objects(vals: dict[str, Any], release: str = "podtap",
                   namespace: str = "podtap") -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for these values."""
    mod = render_module()
    rendered = mod.render(vals, release=release, namespace=namespace)
    return [yaml.safe_load(doc) for doc in mod.documents(rendered)]


def notes(vals: dict[str, Any]) -> str:
    rendered = render_module().render(vals)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


class Rendered:
    """The objects of one render, by kind."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"{len(found)} {kind} objects"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("DaemonSet")["spec"]["template"]["spec"]
        return spec

    @property
    def agent(self) -> dict[str, Any]:
        return next(c for c in self.pod["containers"] if c["name"] == "podtap")

    @property
    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.one("ConfigMap")["data"]["podtap.yaml"])
        return data

    def rules(self) -> list[tuple[str, str]]:
        """(resource, verb) pairs of the ClusterRole."""
        return sorted(
            (res, verb)
            for rule in self.one("ClusterRole")["rules"]
            for res in rule["resources"]
            for verb in rule["verbs"]
        )

    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.agent.get("env", [])}

    def mounts(self, container: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        return {m["mountPath"]: m for m in (container or self.agent)["volumeMounts"]}

    def volumes(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self.pod["volumes"]}


def rendered(name_or_values: str | dict[str, Any]) -> Rendered:
    vals = values(name_or_values) if isinstance(name_or_values, str) else name_or_values
    return Rendered(render_objects(vals))
