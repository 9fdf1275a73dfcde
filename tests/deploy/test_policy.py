"""checkov (offline) on the chart's renders: every finding is one tests/deploy/checkov-accepted.yaml
justifies, and the capabilities mode removes the privileged ones."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import REPO, VALUES_FILES, render_module, values

ACCEPTED = Path(__file__).resolve().parent / "checkov-accepted.yaml"
CHECKOV = REPO / "scripts" / "checkov.sh"
PRIVILEGED_ONLY = {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_28", "CKV_K8S_37"}


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """values file -> the checkov check ids its render fails."""
    root = tmp_path_factory.mktemp("renders")
    mod = render_module()
    for name in VALUES_FILES:
        out = root / name
        out.mkdir()
        for i, doc in enumerate(mod.documents(mod.render(values(name)))):
            (out / f"{i:02d}.yaml").write_text(doc)
    # Installs checkov into its own virtualenv on first use: a generous timeout.
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(root), "--framework", "kubernetes", "-o", "json", "--quiet",
         "--compact"],
        capture_output=True, text=True, timeout=1200, cwd=REPO,
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1: there are failed checks
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    found: dict[str, set[str]] = defaultdict(set)
    parsed = 0
    for report in reports:
        parsed += report["summary"]["resource_count"]
        assert report["summary"]["parsing_errors"] == 0
        for check in report["results"]["failed_checks"]:
            found[Path(check["file_path"]).parts[-2]].add(check["check_id"])
    assert parsed >= 6 * len(VALUES_FILES)  # every render was read
    return found


def accepted() -> dict[str, str]:
    data: dict[str, str] = yaml.safe_load(ACCEPTED.read_text())
    return data


def test_every_finding_is_justified(findings: dict[str, set[str]]) -> None:
    justified = accepted()
    for name in VALUES_FILES:
        assert findings[name] - set(justified) == set(), name
    for check_id, why in justified.items():
        assert len(why.split()) >= 8, f"{check_id}: say why"


def test_no_justification_is_stale(findings: dict[str, set[str]]) -> None:
    seen = set().union(*findings.values())
    assert set(accepted()) - seen == set()


def test_capabilities_mode_is_not_privileged_for_checkov(findings: dict[str, set[str]]) -> None:
    assert findings["default"] >= PRIVILEGED_ONLY
    assert findings["capabilities"] & PRIVILEGED_ONLY == set()
