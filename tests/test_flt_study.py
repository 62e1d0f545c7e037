"""The reference study in miniature, end to end: suite, report, and every claim judged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopdiag.cli import app
from loopdiag.store import load_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_study_trains_reports_and_judges_every_claim(tmp_path):
    out = tmp_path / "small"
    result = CliRunner().invoke(app, ["run", str(ROOT / "probes" / "flt-stability-small.toml"),
                                      "--wandb", "off", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(load_suite(out / "runs").runs) == 24 and (out / "report.md").is_file()
    claims = tmp_path / "claims.md"
    judged = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flt_claims.py"), "--suite",
                             str(out / "runs"), "--out", str(claims)], capture_output=True, text=True)
    assert judged.returncode == 0, judged.stderr
    text = claims.read_text()
    for claim in ("C1", "C2", "C3", "C4", "C5", "C6"):
        assert claim in judged.stdout
    assert sum(text.count(f"**Verdict: {v}.**") for v in ("supported", "contradicted", "cannot tell")) == 6
