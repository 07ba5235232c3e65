"""`s2v demo` end to end (without its sweep): it finishes and prints real headline figures."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.cli import main as s2v

pytestmark = pytest.mark.integration


def test_demo_prints_headline_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("S2V_PSEUDONYM_KEY", "s2v-demo-test-key-0123456789")  # the same splits every run
    monkeypatch.chdir(tmp_path)
    assert s2v(["demo", "--workdir", str(tmp_path / "demo"), "--no-sweep", "--steps", "20"]) == 0
    printed = capsys.readouterr().out
    # Ray's own progress output may come first on stdout: the summary is the JSON object before "Headline".
    summary = json.loads(printed[printed.index('{\n  "workdir"') : printed.index("\nHeadline")])

    staging = summary["staging"]
    for head in ("linear", "temporal", "majority"):
        assert 0.0 <= staging[f"staging.{head}"]["macro_f1"] <= 1.0, head
    assert {"robustness.wearable", "robustness.only:eeg"} <= set(staging)
    assert summary["ahi"]["outcome"]["mae"] >= 0.0, summary["ahi"]
    assert summary["site_probe"], "the site probe's figures"
    assert "staging, linear probe: kappa" in printed and "wearable sensors, full-PSG probe" in printed
    assert summary["mlflow_tracking_uri"].startswith("sqlite:///") and (tmp_path / "demo" / "mlflow.db").is_file()
    assert not (tmp_path / "mlruns").exists()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the demo's store does not leak into later runs
