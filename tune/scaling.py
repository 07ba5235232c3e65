"""The scaling report of a sweep: ``scaling.json``, ``scaling.png``, MLflow artifacts.

Takes one record per trial and seed (what :mod:`tune.sweep` collects from
Tune), fits the candidate laws of :mod:`s2v_core.scaling` on the finished
ones and writes

``SWEEP_DIR/scaling.json``
    ``trials`` (every trial, failed ones with their error), ``counts``,
    ``design`` (the plan: scoring pairs, subsets, sizes, compute),
    ``loss`` (every candidate law of the held-out loss at the scoring pairs
    on test subjects: AIC, BIC, CV error, the selected form with bootstrap
    intervals over seeds and subsets), ``downstream`` (the same for the
    staging probe's error ``1 - macro-F1``), ``verdicts`` (per law, in
    words: is the dependence on N / on M identified?) and ``extrapolation``
    (the pre-registered forecast of the held-out points scored against them,
    next to the no-scaling forecast).
``SWEEP_DIR/scaling.png``
    Loss vs N per M, loss vs M per N (both with the selected law), the
    fitted surface, residuals against the fit, and the extrapolation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from s2v_core.scaling import evaluate_law, fit_scaling_laws, score_forecast

logger = logging.getLogger(__name__)

#: Trial record keys: the loss the law is fitted to and the downstream figure.
LOSS_KEY = "test_loss"
DOWNSTREAM_KEY = "downstream_error"


def build_report(
    trials: list[dict],
    *,
    plan: dict | None = None,
    predictions: dict | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict:
    """Fit the scaling laws on the finished trials and score the pre-registered forecast.

    Parameters
    ----------
    trials : list of dict
        One record per trial and seed with ``status``, ``key``, ``n_params``,
        ``modality_count``, ``seed``, ``subset``, ``phase`` and, when
        finished, ``test_loss`` (nats) and ``downstream_error``.
    plan : dict, optional
        The sweep's plan summary (copied into ``design``).
    predictions : dict, optional
        The content of ``predictions.json`` written before the held-out trials ran.
    bootstrap, seed : int
        Cluster-bootstrap refits and their seed.

    Returns
    -------
    dict
        The content of ``scaling.json`` (JSON-ready).
    """
    finished = [t for t in trials if t.get("status") == "finished" and finite(t.get(LOSS_KEY))]
    report: dict = {
        "trials": sorted(
            trials,
            key=lambda t: (t.get("n_params", 0), t.get("modality_count", 0), t.get("subset", 0), t.get("seed", 0)),
        ),
        "counts": {
            "trials": len(trials),
            "finished": sum(t.get("status") == "finished" for t in trials),
            "failed": sum(t.get("status") == "failed" for t in trials),
        },
        "design": plan or {},
    }
    report["loss"] = _analysis(finished, LOSS_KEY, bootstrap=bootstrap, seed=seed)
    report["downstream"] = _analysis(
        [t for t in finished if finite(t.get(DOWNSTREAM_KEY)) and t[DOWNSTREAM_KEY] > 0],
        DOWNSTREAM_KEY,
        bootstrap=bootstrap,
        seed=seed,
    )
    report["verdicts"] = {law: value["verdict"] for law, value in report["loss"].get("verdicts", {}).items()} or {
        "N": "not identified: " + report["loss"].get("error", "no fit"),
        "M": "not identified: " + report["loss"].get("error", "no fit"),
    }
    report["extrapolation"] = _extrapolation(finished, predictions)
    report["extrapolation_summary"] = {
        axis: {
            k: v.get(k)
            for k in (
                "relative_error",
                "relative_error_where_no_scaling",
                "no_scaling_relative_error",
                "beats_no_scaling",
                "error",
            )
        }
        for axis, v in report["extrapolation"].get("forecasts", {}).items()
    }
    return report


def _analysis(points: list[dict], key: str, *, bootstrap: int, seed: int) -> dict:
    if not points:
        return {"metric": key, "error": "no finished trial"}
    try:
        analysis = fit_scaling_laws(
            [p[key] for p in points],
            n_params=[p["n_params"] for p in points],
            modality_counts=[p["modality_count"] for p in points],
            groups=np.column_stack([[p.get("seed", 0) for p in points], [p.get("subset", 0) for p in points]]),
            bootstrap=bootstrap,
            seed=seed,
        )
    except ValueError as error:
        return {"metric": key, "trials": len(points), "error": str(error)}
    return {"metric": key, "trials": len(points), **analysis.to_dict()}


def _extrapolation(finished: list[dict], predictions: dict | None) -> dict:
    if not predictions:
        return {"error": "no pre-registered forecast (the sweep ran without held-out points)"}
    observed: dict[tuple[float, float], list[float]] = {}
    for t in finished:
        if t.get("phase") == "held_out":
            observed.setdefault((float(t["n_params"]), float(t["modality_count"])), []).append(t[LOSS_KEY])
    means = {cell: float(np.mean(values)) for cell, values in observed.items()}
    out = {
        "written_at": predictions.get("written_at"),
        "written_at_iso": predictions.get("written_at_iso"),
        "forecasts": {},
    }
    for axis, forecast in predictions.get("forecasts", {}).items():
        if "error" in forecast:
            out["forecasts"][axis] = {"error": forecast["error"]}
            continue
        out["forecasts"][axis] = {"form": forecast["form"], "law": forecast["law"], **score_forecast(forecast, means)}
    return out


# -- plots ---------------------------------------------------------------------------------------------


def plot_report(report: dict, path: str | Path) -> Path:
    """Draw ``scaling.png`` (six panels, see the module docstring) and return its path."""
    # Figure without pyplot: no global backend state in a library.
    from matplotlib.figure import Figure

    points = [t for t in report["trials"] if t.get("status") == "finished" and finite(t.get(LOSS_KEY))]
    loss = report.get("loss", {})
    form = loss.get("selected")
    params = loss.get("forms", {}).get(form, {}).get("params") if form else None

    def law(n, m):
        return evaluate_law(form, params, n, m) if params else None

    figure = Figure(figsize=(16, 9), layout="constrained")
    axes = figure.subplots(2, 3)
    ns = sorted({t["n_params"] for t in points})
    ms = sorted({t["modality_count"] for t in points})
    by_n, by_m, surface, residual, extrap = axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]
    for i, m in enumerate(ms):
        sel = [t for t in points if t["modality_count"] == m]
        by_n.plot(
            [t["n_params"] for t in sel], [t[LOSS_KEY] for t in sel], "o", color=f"C{i % 10}", alpha=0.6, label=f"M={m}"
        )
        if params and ns:
            grid = np.geomspace(min(ns), max(ns), 60)
            by_n.plot(grid, law(grid, np.full_like(grid, m)), "-", color=f"C{i % 10}")
    by_n.set_xscale("log")
    by_n.set_xlabel("non-embedding parameters N")
    by_n.set_ylabel("test loss at the scoring pairs (nats)")
    by_n.set_title(f"loss vs N per M ({form or 'no fit'})")
    for i, n in enumerate(ns):
        sel = [t for t in points if t["n_params"] == n]
        by_m.plot(
            [t["modality_count"] for t in sel],
            [t[LOSS_KEY] for t in sel],
            "o",
            color=f"C{i % 10}",
            alpha=0.6,
            label=f"N={n:.3g}",
        )
        if params and ms:
            grid = np.linspace(min(ms), max(ms), 60)
            by_m.plot(grid, law(np.full_like(grid, n), grid), "-", color=f"C{i % 10}")
    by_m.set_xlabel("modality count M")
    by_m.set_title("loss vs M per N")
    for ax in (by_n, by_m):
        if points:
            ax.legend(fontsize=7)
    if params and len(ns) > 1 and len(ms) > 1:
        grid_n, grid_m = np.meshgrid(np.geomspace(min(ns), max(ns), 40), np.linspace(min(ms), max(ms), 40))
        image = surface.contourf(grid_n, grid_m, law(grid_n, grid_m), levels=15)
        surface.set_xscale("log")
        figure.colorbar(image, ax=surface, label="fitted loss (nats)")
        surface.plot([t["n_params"] for t in points], [t["modality_count"] for t in points], "k.", ms=3)
    surface.set_xlabel("N")
    surface.set_ylabel("M")
    surface.set_title(loss.get("law", "fitted surface: no fit"))
    if params and points:
        fitted = np.array([law(t["n_params"], t["modality_count"]) for t in points], dtype=float)
        observed = np.array([t[LOSS_KEY] for t in points])
        residual.plot(fitted, (observed - fitted) / fitted, "o", alpha=0.6)
        residual.axhline(0.0, color="k", lw=0.8)
    residual.set_xlabel("fitted loss (nats)")
    residual.set_ylabel("relative residual")
    residual.set_title("residuals of the selected law")
    markers = {"n": "o", "m": "s"}
    for axis, forecast in report.get("extrapolation", {}).get("forecasts", {}).items():
        rows = [r for r in forecast.get("targets", []) if r.get("observed") is not None]
        if not rows:
            continue
        obs = [r["observed"] for r in rows]
        pred = [r["predicted"] for r in rows]
        err = np.array([[r["predicted"] - r["interval"][0], r["interval"][1] - r["predicted"]] for r in rows]).T
        extrap.errorbar(
            obs,
            pred,
            yerr=np.nan_to_num(np.abs(err)),
            fmt=markers.get(axis, "o"),
            label=f"law, held-out largest {axis.upper()}",
        )
        naive = [(r["observed"], r["no_scaling"]) for r in rows if r.get("no_scaling") is not None]
        if naive:
            extrap.plot(*zip(*naive), "x", label=f"no scaling, {axis.upper()}")
    lims = [t[LOSS_KEY] for t in points]
    if lims:
        extrap.plot([min(lims), max(lims)], [min(lims), max(lims)], "k--", lw=0.8)
    if extrap.get_legend_handles_labels()[1]:
        extrap.legend(fontsize=7)
    extrap.set_xlabel("observed held-out loss (mean over seeds, subsets)")
    extrap.set_ylabel("forecast written before the run")
    extrap.set_title("pre-registered extrapolation")
    words = axes[1, 2]
    words.axis("off")
    words.text(
        0.0,
        1.0,
        "\n\n".join(f"{law_name}: {text}" for law_name, text in report.get("verdicts", {}).items()),
        va="top",
        wrap=True,
        fontsize=9,
    )
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def write_report(
    sweep_dir: str | Path,
    trials: list[dict],
    *,
    plan: dict | None = None,
    predictions: dict | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Write ``scaling.json`` and ``scaling.png`` under ``sweep_dir``; log both to MLflow.

    When ``mlflow_run_id`` (the sweep's parent run) is given, the two files
    (and ``predictions.json`` when present) are its artifacts and the
    headline numbers its metrics; ``tracking_uri`` is then required, so the
    run's own store is always named. Returns the report dict.
    """
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(trials, plan=plan, predictions=predictions, bootstrap=bootstrap, seed=seed)
    json_path = sweep_dir / "scaling.json"
    json_path.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    png_path = plot_report(report, sweep_dir / "scaling.png")
    logger.info("scaling report written to %s and %s", json_path, png_path)
    if mlflow_run_id is not None:
        if not tracking_uri:
            raise ValueError("write_report: tracking_uri is required with mlflow_run_id (the sweep's own store)")
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for artifact in (json_path, png_path, sweep_dir / "predictions.json"):
            if artifact.is_file():
                client.log_artifact(mlflow_run_id, str(artifact))
        for key, value in headline_metrics(report).items():
            client.log_metric(mlflow_run_id, key, value)
    return report


def headline_metrics(report: dict) -> dict[str, float]:
    """The few numbers worth a metric on the parent run (finite ones only)."""
    out = {"trials_finished": float(report["counts"]["finished"]), "trials_failed": float(report["counts"]["failed"])}
    for prefix, analysis in (("loss", report.get("loss", {})), ("downstream", report.get("downstream", {}))):
        selected = analysis.get("forms", {}).get(analysis.get("selected"), {})
        for name in ("alpha", "beta", "E"):
            if name in selected.get("params", {}):
                out[f"{prefix}_{name}"] = selected["params"][name]
        for law, verdict in analysis.get("verdicts", {}).items():
            out[f"{prefix}_{law}_identified"] = float(verdict["identified"])
    for axis, summary in report.get("extrapolation_summary", {}).items():
        for name in ("relative_error", "no_scaling_relative_error"):
            if summary.get(name) is not None:
                out[f"extrapolation_{axis}_{name}"] = summary[name]
    return {k: float(v) for k, v in out.items() if finite(v)}


def finite(value) -> bool:
    """Whether ``value`` is a number (or numpy scalar) that is not NaN or infinite."""
    try:
        return value is not None and bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def json_default(value):
    """``json.dumps(default=…)`` for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
