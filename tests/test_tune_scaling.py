"""The sweep's scaling report (tune.scaling): laws of the loss and the probe error, verdicts, forecast, plot."""

import json

import numpy as np

from s2v_core.scaling import evaluate_law
from tune.scaling import build_report, write_report
from tune.sweep import write_predictions

LOSS_LAW = {"E": 1.5, "A": 40.0, "alpha": 0.35, "B": 1.2, "beta": 0.6}
ERROR_LAW = {"E": 0.2, "A": 6.0, "alpha": 0.3, "B": 0.4, "beta": 0.8}
N_PARAMS = (1e4, 3e4, 1e5, 3e5, 1e6)
COUNTS = (2, 3, 5, 7)


def trials(*, seeds=3, noise=0.005, seed=0):
    """Records of a 5 x 4 grid x 2 subsets x seeds, largest N and M held out, plus one failed trial."""
    rng = np.random.default_rng(seed)
    out = []
    for width, n in enumerate(N_PARAMS):
        for m in COUNTS:
            for subset in range(2):
                for s in range(seeds):
                    noise_loss, noise_error = np.exp(rng.normal(0.0, noise, 2))
                    out.append(
                        {
                            "key": f"w{width}-d1-m{m}-k{subset}-s{s}",
                            "status": "finished",
                            "n_params": n,
                            "modality_count": m,
                            "subset": subset,
                            "seed": s,
                            "phase": "held_out" if n == max(N_PARAMS) or m == max(COUNTS) else "main",
                            "test_loss": float(evaluate_law("additive", LOSS_LAW, n, m) * noise_loss),
                            "downstream_error": float(evaluate_law("additive", ERROR_LAW, n, m) * noise_error),
                        }
                    )
    out.append(
        {
            "key": "broken",
            "status": "failed",
            "n_params": 5e6,
            "modality_count": 2,
            "subset": 0,
            "seed": 0,
            "phase": "main",
            "error": "RuntimeError: boom",
        }
    )
    return out


def test_report_fits_both_figures_and_says_both_laws_are_identified(tmp_path):
    records = trials()
    main = [r for r in records if r["phase"] == "main"]
    predictions = write_predictions(tmp_path, main, records, axes={"n": True, "m": True}, bootstrap=20, seed=0)
    report = build_report(records, predictions=predictions, bootstrap=30)
    assert report["counts"] == {"trials": 121, "finished": 120, "failed": 1}
    loss = report["loss"]
    assert loss["selected"] in ("additive", "interaction", "saturating")
    assert abs(loss["forms"][loss["selected"]]["params"]["alpha"] - LOSS_LAW["alpha"]) < 0.05
    assert set(loss["forms"]) >= {"additive", "multiplicative", "saturating", "n_only", "m_only"}
    assert all({"aic", "bic", "cv_rmse"} <= set(f) for f in loss["forms"].values())
    assert report["verdicts"]["N"].startswith("identified") and report["verdicts"]["M"].startswith("identified")
    assert (
        abs(report["downstream"]["forms"][report["downstream"]["selected"]]["params"]["alpha"] - ERROR_LAW["alpha"])
        < 0.06
    )
    # The forecast was fitted on the main phase only and is scored against the held-out cells.
    n_forecast = report["extrapolation"]["forecasts"]["n"]
    assert n_forecast["scored"] == len(COUNTS)
    assert n_forecast["relative_error"] < 0.05 and n_forecast["beats_no_scaling"]
    m_forecast = report["extrapolation"]["forecasts"]["m"]
    assert m_forecast["scored"] == len(N_PARAMS)
    assert m_forecast["relative_error"] < 0.05 and m_forecast["beats_no_scaling"]


def test_forecast_file_holds_only_main_points_and_its_time(tmp_path):
    records = trials(seeds=1)
    main = [r for r in records if r["phase"] == "main"]
    content = write_predictions(tmp_path, main, records, axes={"n": True, "m": False}, bootstrap=0, seed=0)
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved["written_at"] == content["written_at"] > 0
    assert set(saved["fitted_on"]) == {r["key"] for r in main if r["status"] == "finished"}
    assert set(saved["forecasts"]) == {"n"}
    cells = {(t["n_params"], t["modality_count"]) for t in saved["forecasts"]["n"]["targets"]}
    assert cells == {(max(N_PARAMS), float(m)) for m in COUNTS}


def test_too_few_sizes_are_reported_not_raised(tmp_path):
    records = [r for r in trials(seeds=1) if r.get("n_params", 0) <= 3e4]  # two sizes only
    report = write_report(tmp_path, records, bootstrap=0)
    assert report["verdicts"]["N"].startswith("not identified: only 2 distinct value(s) of parameters N")
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    assert json.loads((tmp_path / "scaling.json").read_text())["counts"]["finished"] == len(records)


def test_write_report_plots_every_panel(tmp_path):
    records = trials(seeds=1)
    main = [r for r in records if r["phase"] == "main"]
    predictions = write_predictions(tmp_path, main, records, axes={"n": True, "m": True}, bootstrap=10, seed=0)
    report = write_report(tmp_path, records, predictions=predictions, bootstrap=10)
    assert (tmp_path / "scaling.png").stat().st_size > 20000
    assert set(report["extrapolation_summary"]) == {"n", "m"}
