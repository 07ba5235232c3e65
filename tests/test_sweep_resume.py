"""s2v sweep --resume: an interrupted sweep continues without re-running finished trials and seeds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s2v_core.toystore import write_toy_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]


def events(output: Path) -> list[dict]:
    path = output / "trial_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sweep_command(store: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.cli",
        "sweep",
        "--data",
        str(store),
        "--output",
        str(output),
        "--widths",
        "16",
        "--modality-counts",
        "2",
        "--seeds",
        "2",
        "--scoring-pairs",
        "eeg-ecg",
        "--steps",
        "3",
        "--global-batch",
        "4",
        "--score-windows",
        "8",
        "--probe-windows",
        "16",
        "--bootstrap",
        "10",
        "--max-concurrent",
        "1",
        "--num-cpus",
        "2",
        *extra,
    ]


def test_interrupted_sweep_resumes_without_rerunning_finished_seeds(tmp_path):
    store = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=4,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=("eeg", "ecg", "spo2"),
        seed=1,
        val_per_site=1,
        test_per_site=1,
    )
    output = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}

    # Two seeds of one point, one at a time; interrupt (SIGINT, Tune's graceful stop)
    # once the second seed has started, i.e. once Tune has recorded the first as done.
    first = subprocess.Popen(
        sweep_command(store, output), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and first.poll() is None:
        if len([e for e in events(output) if e["event"] == "start"]) >= 2:
            break
        time.sleep(1)
    assert first.poll() is None, f"sweep ended before it could be interrupted:\n{first.stdout.read()[-3000:]}"
    first.send_signal(signal.SIGINT)
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 130, log[-3000:]
    finished_before = {e["key"] for e in events(output) if e["event"] == "finish"}
    assert len(finished_before) == 1, log[-3000:]
    partial = json.loads((output / "scaling.json").read_text())
    assert partial["counts"]["finished"] == 1

    resumed = subprocess.run(
        sweep_command(store, output, "--resume"), env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    starts = [e["key"] for e in events(output) if e["event"] == "start"]
    (done,) = finished_before
    assert done in ("w16-d1-m2-k0-s0", "w16-d1-m2-k0-s1")
    assert starts.count(done) == 1  # the finished seed was not run again
    report = json.loads((output / "scaling.json").read_text())
    assert report["counts"] == {"trials": 2, "finished": 2, "failed": 0}
    assert {t["key"] for t in report["trials"] if t["status"] == "finished"} == {"w16-d1-m2-k0-s0", "w16-d1-m2-k0-s1"}

    # A second --resume of a finished sweep changes nothing; a fresh start in the same place is refused.
    again = subprocess.run(sweep_command(store, output), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a sweep" in again.stderr
