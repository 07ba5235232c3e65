"""The scaling-law report of a sweep: ``scaling.json``, ``scaling.png``, MLflow artifacts.

Takes one record per trial (what :mod:`tune.sweep` collects from Tune),
fits the laws of :mod:`s2v_core.scaling` on the finished trials and writes

``SWEEP_DIR/scaling.json``
    ``trials`` (every trial, failed ones with their error), ``fit`` (the
    joint law ``L(N, M)``), ``fits_by_modality_count`` (``L(N)`` at each M),
    ``fits_by_width`` (``L(M)`` at each width/depth), ``extrapolation``
    (fit without the largest model, predict it), ``downstream`` (the joint
    law and its extrapolation fitted to the staging probe's error,
    ``1 - staging_macro_f1``) and ``fit_subset`` (which trials entered the
    fits). A fit that the data cannot support is recorded as
    ``{"error": "..."}`` instead of failing the report.
``SWEEP_DIR/scaling.png``
    Left: validation loss against non-embedding parameters, one colour per
    modality count, with the fitted curves. Right: loss against modality
    count, one colour per width.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from s2v_core.scaling import ScalingFit, extrapolation_check, fit_scaling_law

logger = logging.getLogger(__name__)

#: Trial record keys (see :func:`tune.sweep.sweep`): the loss the law is fitted to.
LOSS_KEY = "val_loss"
#: The downstream figure the same law is also fitted to (as ``1 - macro-F1``).
DOWNSTREAM_KEY = "staging_macro_f1"


def build_report(trials: list[dict], *, bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit the scaling laws on the finished trials of ``trials``.

    Parameters
    ----------
    trials : list of dict
        One record per trial with at least ``status`` (``"finished"`` or
        ``"failed"``), ``width``, ``depth``, ``modality_count``,
        ``data_fraction``, ``n_params`` (non-embedding parameters) and,
        when finished, ``val_loss`` (held-out contrastive loss, nats).
    bootstrap, seed : int
        Bootstrap refits and their seed (see :func:`s2v_core.scaling.fit_scaling_law`).

    Returns
    -------
    dict
        The content of ``scaling.json`` (JSON-ready).
    """
    finished = [t for t in trials if t.get("status") == "finished" and _finite(t.get(LOSS_KEY))]
    # Data fraction is a third axis; the laws over N and M are fitted at the
    # largest fraction (the full-data setting) so that data size is held fixed.
    fraction = max((t["data_fraction"] for t in finished), default=None)
    points = [t for t in finished if t["data_fraction"] == fraction]
    report: dict = {
        "trials": sorted(trials, key=lambda t: (t.get("data_fraction", 0), t.get("width", 0),
                                                t.get("depth", 0), t.get("modality_count", 0))),
        "counts": {
            "trials": len(trials),
            "finished": sum(t.get("status") == "finished" for t in trials),
            "failed": sum(t.get("status") == "failed" for t in trials),
        },
        "fit_subset": {"data_fraction": fraction, "trials": len(points), "loss": LOSS_KEY},
    }
    losses = np.array([t[LOSS_KEY] for t in points], dtype=float)
    n = np.array([t["n_params"] for t in points], dtype=float)
    m = np.array([t["modality_count"] for t in points], dtype=float)

    report["fit"] = _try(lambda: fit_scaling_law(losses, n_params=n, modality_counts=m,
                                                 bootstrap=bootstrap, seed=seed))
    report["fits_by_modality_count"] = {
        str(int(count)): _try(lambda sel=(m == count): fit_scaling_law(
            losses[sel], n_params=n[sel], bootstrap=bootstrap, seed=seed))
        for count in np.unique(m)
    }
    by_model = defaultdict(list)
    for i, t in enumerate(points):
        by_model[(t["width"], t["depth"])].append(i)
    report["fits_by_width"] = {
        f"width={w},depth={d}": _try(lambda idx=idx: fit_scaling_law(
            losses[idx], modality_counts=m[idx], bootstrap=bootstrap, seed=seed))
        for (w, d), idx in sorted(by_model.items())
    }
    report["extrapolation"] = _try(lambda: extrapolation_check(losses, n_params=n, modality_counts=m,
                                                               seed=seed))
    report["downstream"] = _downstream_fit(points, n, m, bootstrap=bootstrap, seed=seed)
    return report


def _downstream_fit(points: list[dict], n: np.ndarray, m: np.ndarray, *, bootstrap: int, seed: int) -> dict:
    """The joint law fitted to the staging probe's error, ``1 - staging_macro_f1``, of the same trials.

    The contrastive loss measures alignment of the reference pairs; whether
    more modalities or parameters give a better *representation* shows in
    what a linear probe can read from it, so the same law is fitted to the
    probe's error as a second view (it is not the headline fit).
    """
    f1 = np.array([t.get(DOWNSTREAM_KEY, np.nan) for t in points], dtype=float)
    out: dict = {"metric": f"1 - {DOWNSTREAM_KEY}", "trials": int(np.isfinite(f1).sum())}
    if not np.isfinite(f1).all():
        out["error"] = f"{DOWNSTREAM_KEY} is missing or not finite for {int((~np.isfinite(f1)).sum())} trial(s)"
        return out
    error = 1.0 - f1
    out["fit"] = _try(lambda: fit_scaling_law(error, n_params=n, modality_counts=m, bootstrap=bootstrap, seed=seed))
    out["extrapolation"] = _try(lambda: extrapolation_check(error, n_params=n, modality_counts=m, seed=seed))
    return out


def plot_report(report: dict, path: str | Path) -> Path:
    """Draw ``scaling.png`` from a report of :func:`build_report` and return its path."""
    # Figure without pyplot: no global backend state in a library.
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    points = [t for t in report["trials"] if t.get("status") == "finished" and _finite(t.get(LOSS_KEY))
              and t["data_fraction"] == report["fit_subset"]["data_fraction"]]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    counts = sorted({t["modality_count"] for t in points})
    joint = report.get("fit", {})
    for i, count in enumerate(counts):
        colour = f"C{i % 10}"
        sel = sorted((t for t in points if t["modality_count"] == count), key=lambda t: t["n_params"])
        left.plot([t["n_params"] for t in sel], [t[LOSS_KEY] for t in sel], "o", color=colour,
                  label=f"M={count}")
        curve = _curve_over_n(joint, report["fits_by_modality_count"].get(str(count), {}), sel, count)
        if curve is not None:
            left.plot(*curve, "-", color=colour, alpha=0.8)
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short range
    left.set_xlabel("non-embedding parameters N")
    left.set_ylabel("validation loss, reference pairs (nats)")
    left.set_title(_title(joint, "loss vs parameters"))
    if counts:
        left.legend(fontsize=8)

    models = sorted({(t["width"], t["depth"]) for t in points})
    for i, (width, depth) in enumerate(models):
        colour = f"C{i % 10}"
        sel = sorted((t for t in points if (t["width"], t["depth"]) == (width, depth)),
                     key=lambda t: t["modality_count"])
        right.plot([t["modality_count"] for t in sel], [t[LOSS_KEY] for t in sel], "o", color=colour,
                   label=f"width={width}, depth={depth}")
        if "params" in joint and sel:
            grid = np.linspace(min(counts), max(counts), 50)
            right.plot(grid, _joint(joint, np.full_like(grid, sel[0]["n_params"]), grid), "-",
                       color=colour, alpha=0.8)
    right.set_xlabel("modality count M")
    right.set_ylabel("validation loss, reference pairs (nats)")
    right.set_title("loss vs modality count (lines: joint fit)")
    if models:
        right.legend(fontsize=8)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_report(
    sweep_dir: str | Path,
    trials: list[dict],
    *,
    bootstrap: int = 200,
    seed: int = 0,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Write ``scaling.json`` and ``scaling.png`` under ``sweep_dir``; log both to MLflow.

    When ``mlflow_run_id`` is given (the sweep's parent run), the two files
    are logged as its artifacts and the headline numbers (exponents, R²,
    extrapolation error) as its metrics. Returns the report dict.
    """
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(trials, bootstrap=bootstrap, seed=seed)
    json_path = sweep_dir / "scaling.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False, default=_json_default) + "\n")
    png_path = plot_report(report, sweep_dir / "scaling.png")
    logger.info("scaling report written to %s and %s", json_path, png_path)
    if mlflow_run_id is not None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        client.log_artifact(mlflow_run_id, str(json_path))
        client.log_artifact(mlflow_run_id, str(png_path))
        for key, value in headline_metrics(report).items():
            client.log_metric(mlflow_run_id, key, value)
    return report


def headline_metrics(report: dict) -> dict[str, float]:
    """The few numbers worth a metric on the parent run (finite ones only)."""
    out = {"trials_finished": float(report["counts"]["finished"]),
           "trials_failed": float(report["counts"]["failed"])}
    fit = report.get("fit", {})
    for name in ("E", "alpha", "beta"):
        if name in fit.get("params", {}):
            out[f"fit_{name}"] = fit["params"][name]
    if "r2_log" in fit:
        out["fit_r2_log"] = fit["r2_log"]
    if "relative_error" in report.get("extrapolation", {}):
        out["extrapolation_relative_error"] = report["extrapolation"]["relative_error"]
    downstream = report.get("downstream", {}).get("fit", {})
    for name in ("alpha", "beta"):
        if name in downstream.get("params", {}):
            out[f"downstream_fit_{name}"] = downstream["params"][name]
    return {k: float(v) for k, v in out.items() if _finite(v)}


def _try(fit_fn) -> dict:
    try:
        result = fit_fn()
    except ValueError as exc:
        return {"error": str(exc)}
    return result.to_dict() if isinstance(result, ScalingFit) else result


def _curve_over_n(joint: dict, by_count: dict, sel: list[dict], count: float):
    if not sel:
        return None
    grid = np.geomspace(min(t["n_params"] for t in sel), max(t["n_params"] for t in sel), 50)
    if "params" in joint:
        return grid, _joint(joint, grid, np.full_like(grid, count))
    if "params" in by_count:
        p = by_count["params"]
        return grid, p["E"] + p["A"] * grid ** -p["alpha"]
    return None


def _joint(fit: dict, n, m):
    p = fit["params"]
    return p["E"] + p["A"] * np.asarray(n) ** -p["alpha"] + p["B"] * np.asarray(m) ** -p["beta"]


def _title(fit: dict, fallback: str) -> str:
    if "params" not in fit:
        return f"{fallback} (no joint fit)"
    p = fit["params"]
    return f"L = {p['E']:.3g} + {p['A']:.3g} N^-{p['alpha']:.3f} + {p['B']:.3g} M^-{p['beta']:.3f}"


def _finite(value) -> bool:
    try:
        return value is not None and bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
