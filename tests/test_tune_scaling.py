"""The sweep's scaling report (tune.scaling): fits of the loss and of the probe's error, the plot."""

import json

import numpy as np

from s2v_core.scaling import scaling_law
from tune.scaling import build_report, write_report

LOSS_LAW = {"E": 1.5, "A": 40.0, "alpha": 0.35, "B": 1.2, "beta": 0.6}
ERROR_LAW = {"E": 0.2, "A": 6.0, "alpha": 0.3, "B": 0.4, "beta": 0.8}
N_PARAMS = (1e4, 3e4, 1e5, 3e5, 1e6)
COUNTS = (2, 3, 5, 9)


def trials(*, f1=True, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for width, n in enumerate(N_PARAMS):
        for m in COUNTS:
            noise = np.exp(rng.normal(0.0, 0.005, 2))
            record = {"key": f"w{width}-m{m}", "status": "finished", "width": width, "depth": 2,
                      "modality_count": m, "data_fraction": 1.0, "n_params": n,
                      "val_loss": float(scaling_law("NM", LOSS_LAW, n, m) * noise[0])}
            if f1:
                record["staging_macro_f1"] = float(1.0 - scaling_law("NM", ERROR_LAW, n, m) * noise[1])
            out.append(record)
    out.append({"key": "broken", "status": "failed", "width": 9, "depth": 2, "modality_count": 2,
                "data_fraction": 1.0, "n_params": 5e6, "error": "RuntimeError: boom"})
    return out


def test_report_fits_the_loss_and_the_probe_error_with_their_own_exponents():
    report = build_report(trials(), bootstrap=50)
    assert report["counts"] == {"trials": 21, "finished": 20, "failed": 1}
    assert abs(report["fit"]["params"]["alpha"] - LOSS_LAW["alpha"]) < 0.05
    downstream = report["downstream"]
    assert downstream["metric"] == "1 - staging_macro_f1" and downstream["trials"] == 20
    assert abs(downstream["fit"]["params"]["alpha"] - ERROR_LAW["alpha"]) < 0.05
    assert abs(downstream["fit"]["params"]["beta"] - ERROR_LAW["beta"]) < 0.15
    assert downstream["extrapolation"]["relative_error"] < 0.05


def test_trials_without_a_probe_score_leave_the_downstream_fit_out_but_not_the_report(tmp_path):
    report = write_report(tmp_path, trials(f1=False), bootstrap=10)
    assert "missing or not finite for 20 trial(s)" in report["downstream"]["error"]
    assert "params" in report["fit"]
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["downstream"] == report["downstream"]
    assert (tmp_path / "scaling.png").stat().st_size > 1000
