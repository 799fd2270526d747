"""The README is executable and the warehouse doc covers the warehouse."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import REPO, cli_env, run_cli
from agentledger.schemas.contract import load_store
from agentledger.schemas.warehouse import event_columns

README = (REPO / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [b.strip() for b in blocks]


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    cmds = quick_start_commands()
    assert cmds[:2] == ["./scripts/demo", "./scripts/test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test" in ci


def test_readme_demo_command_runs_on_an_empty_home(tmp_path):
    home = tmp_path / "fresh"
    env = cli_env(home)
    proc = subprocess.run(["bash", "-c", quick_start_commands()[0]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_cli("sql", "select family, count(*) from events group by 1", "--format", "json", env=env)
    assert {r["family"] for r in json.loads(out.stdout)} == {"session", "sandbox", "approval", "network"}


def test_test_command_fails_rather_than_skips_without_a_broker():
    script = (REPO / "scripts" / "test").read_text()
    assert "set -euo pipefail" in script and "scripts/kafka start" in script
    conftest = (REPO / "tests" / "conftest.py").read_text()
    assert "pytest.fail" in conftest and "pytest.skip" not in conftest


def test_every_events_column_is_documented():
    doc = (REPO / "docs" / "warehouse.md").read_text()
    missing = [c.name for c in event_columns(load_store()) if f"`{c.name}`" not in doc]
    assert not missing, f"docs/warehouse.md lacks: {missing}"


def test_every_detection_column_is_documented():
    """alerts (from the alert schema) and anomaly_scores/detection_state in docs/warehouse.md; the
    detect_events relation rules are written against in docs/detection.md."""
    from agentledger.consumers.detect.prepare import BUILTIN_DIR, columns, load_lists, prepare
    from agentledger.schemas.warehouse import alert_columns, open_warehouse

    wh_doc = (REPO / "docs" / "warehouse.md").read_text()
    with open_warehouse(":memory:") as wh:
        missing = [n for n, _ in alert_columns() if f"`{n}`" not in wh_doc]
        for table in ("anomaly_scores", "detection_state"):
            cols = [r[0] for r in wh.con.execute(f"DESCRIBE {table}").fetchall()]
            missing += [f"{table}.{c}" for c in cols if f"`{c}`" not in wh_doc]
        prepare(wh.con, load_lists([BUILTIN_DIR]), [])
        det_doc = (REPO / "docs" / "detection.md").read_text()
        missing += [f"detect_events.{c}" for c, _ in columns(wh.con) if f"`{c}`" not in det_doc]
    assert not missing, f"undocumented: {missing}"
