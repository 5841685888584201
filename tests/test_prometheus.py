"""The alert rules, checked against the real thing: promtool checks and unit-tests them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "deploy/prometheus").glob("*.yml"))
RULE_TESTS = REPO / "deploy/prometheus/tests/alerts_test.yml"


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: `make test` installs Debian's prometheus package"
    return found


def run_tool(*argv: str | Path) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    out = run_tool(tool("promtool"), "check", "rules", *RULE_FILES)
    assert f"SUCCESS: {len(rules())} rules found" in out


def test_promtool_unit_tests_of_the_alerts() -> None:
    assert "SUCCESS" in run_tool(tool("promtool"), "test", "rules", RULE_TESTS)
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules()}


def test_every_alert_says_how_urgent_and_what_to_do() -> None:
    for rule in rules():
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert len(rule["annotations"]["summary"]) < 100, rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, rule["alert"]
