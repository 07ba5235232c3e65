"""Scaling laws of the validation loss over model size and modality count.

The law fitted here (sleep2vec paper, section on scaling) is

    L(N, M) = E + A * N**-alpha + B * M**-beta

with ``N`` the number of non-embedding parameters of the encoder, ``M`` the
number of modalities seen in pretraining and ``L`` the held-out contrastive
loss (nats). The one-variable forms ``L(N) = E + A * N**-alpha`` and
``L(M) = E + B * M**-beta`` are fitted the same way on slices of a sweep.

Fitting follows the usual practice for power laws with an offset: non-linear
least squares on *log-space* residuals ``log L_hat - log L`` (so that a 1 %
miss costs the same at every loss level), from several starting points,
keeping the best. Uncertainty comes from a seeded residual bootstrap: the
log residuals of the best fit, rescaled by ``sqrt(n / (n - p))`` to undo the
shrinkage of fitted residuals, are resampled onto the fitted curve and the
law is refitted; percentile intervals of the refits are the confidence
intervals. A residual (not case) bootstrap keeps the design fixed, so no
resample loses the distinct widths or modality counts the law needs.

Pure numpy/scipy: no Ray, no MLflow (those live in ``tune/``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

logger = logging.getLogger(__name__)

#: Parameter names of each form, in the order of the internal parameter vector.
FORMS: dict[str, tuple[str, ...]] = {
    "NM": ("E", "A", "alpha", "B", "beta"),
    "N": ("E", "A", "alpha"),
    "M": ("E", "B", "beta"),
}
#: Distinct values of a variable needed to identify its ``coef * x**-exp`` term
#: together with the offset E (two values fit any exponent exactly).
MIN_DISTINCT = 3
#: Exponents are searched in [0, MAX_EXPONENT]; larger values would make the
#: term vanish between two adjacent grid points and are not identifiable.
MAX_EXPONENT = 5.0


@dataclass(frozen=True)
class ScalingFit:
    """A fitted scaling law.

    Attributes
    ----------
    form : {"NM", "N", "M"}
        Which law: joint, parameters only, or modalities only.
    params : dict of str to float
        ``E`` (nats), ``A``/``B`` (nats times N**alpha / M**beta) and the
        exponents ``alpha``/``beta`` (dimensionless), as applicable.
    ci : dict of str to (float, float)
        Bootstrap percentile interval of each parameter at ``confidence``.
    confidence : float
        Coverage of ``ci`` (e.g. 0.95).
    r2_log, rmse_log : float
        Coefficient of determination and root-mean-square error of
        ``log L`` (natural log), over the fitted points.
    n_points : int
        Number of (N, M, L) points fitted.
    bootstrap : int
        Bootstrap refits that converged (and entered ``ci``).
    """

    form: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    confidence: float
    r2_log: float
    rmse_log: float
    n_points: int
    bootstrap: int
    _vector: tuple[float, ...] = field(repr=False, default=())

    def predict(self, n_params=None, modality_counts=None) -> np.ndarray:
        """Predicted loss (nats) at ``n_params`` / ``modality_counts`` (broadcast)."""
        n, m = _check_variables(self.form, n_params, modality_counts)
        return scaling_law(self.form, self.params, n, m)

    def to_dict(self) -> dict:
        """JSON-ready summary (floats and lists only)."""
        return {
            "form": self.form,
            "law": _LAW_TEXT[self.form],
            "params": dict(self.params),
            "ci": {k: [lo, hi] for k, (lo, hi) in self.ci.items()},
            "confidence": self.confidence,
            "r2_log": self.r2_log,
            "rmse_log": self.rmse_log,
            "n_points": self.n_points,
            "bootstrap": self.bootstrap,
        }


_LAW_TEXT = {
    "NM": "L(N, M) = E + A * N**-alpha + B * M**-beta",
    "N": "L(N) = E + A * N**-alpha",
    "M": "L(M) = E + B * M**-beta",
}


def scaling_law(form: str, params: dict[str, float], n_params=None, modality_counts=None) -> np.ndarray:
    """Evaluate the law ``form`` with ``params`` (see :data:`FORMS`) elementwise."""
    if form not in FORMS:
        raise ValueError(f"unknown scaling-law form {form!r}; expected one of {sorted(FORMS)}")
    value = np.asarray(params["E"], dtype=float)
    if "alpha" in FORMS[form]:
        value = value + params["A"] * np.power(np.asarray(n_params, dtype=float), -params["alpha"])
    if "beta" in FORMS[form]:
        value = value + params["B"] * np.power(np.asarray(modality_counts, dtype=float), -params["beta"])
    return value


def fit_scaling_law(
    losses: Sequence[float],
    *,
    n_params: Sequence[float] | None = None,
    modality_counts: Sequence[float] | None = None,
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> ScalingFit:
    """Fit ``L = E + A N^-alpha + B M^-beta`` (or a one-variable form) to sweep results.

    The form follows from the variables given: both -> ``"NM"``, only
    ``n_params`` -> ``"N"``, only ``modality_counts`` -> ``"M"``.

    Parameters
    ----------
    losses : sequence of float
        Validation loss of each trial (nats, > 0 and finite).
    n_params : sequence of float, optional
        Non-embedding parameter count of each trial's encoder (> 0).
    modality_counts : sequence of float, optional
        Number of pretraining modalities of each trial (> 0).
    bootstrap : int
        Residual-bootstrap refits for the confidence intervals (0: none,
        intervals are then ``(nan, nan)``).
    confidence : float
        Coverage of the percentile intervals, in (0, 1).
    seed : int
        Seed of the bootstrap resampling (results are reproducible).

    Returns
    -------
    ScalingFit

    Raises
    ------
    ValueError
        Non-finite or non-positive inputs, mismatched lengths, fewer points
        than parameters, or fewer than three distinct values of a variable.
    """
    form = "NM" if n_params is not None and modality_counts is not None else (
        "N" if n_params is not None else "M" if modality_counts is not None else None)
    if form is None:
        raise ValueError("fit_scaling_law needs n_params, modality_counts or both")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    y = _positive_finite("losses", losses)
    n, m = _check_variables(form, n_params, modality_counts, length=len(y))
    names = FORMS[form]
    if len(y) < len(names):
        raise ValueError(
            f"scaling law {_LAW_TEXT[form]!r} has {len(names)} parameters but only "
            f"{len(y)} points were given; run more trials"
        )
    for label, values in (("n_params", n), ("modality_counts", m)):
        if values is not None and len(np.unique(values)) < MIN_DISTINCT:
            raise ValueError(
                f"{label} has {len(np.unique(values))} distinct value(s) "
                f"({', '.join(f'{v:g}' for v in np.unique(values))}); at least {MIN_DISTINCT} "
                "are needed to identify an offset, a coefficient and an exponent"
            )

    problem = _Problem(form, y, n, m)
    best = problem.solve_multistart()
    params = problem.to_params(best)
    log_pred = np.log(problem.predict(best))
    log_y = np.log(y)
    residuals = log_pred - log_y
    ss_res = float(np.sum(residuals**2))
    ss_tot = float(np.sum((log_y - log_y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")

    samples = []
    if bootstrap:
        rng = np.random.default_rng(seed)
        dof = max(len(y) - len(names), 1)
        scaled = (log_y - log_pred) * np.sqrt(len(y) / dof)
        scaled = scaled - scaled.mean()
        for _ in range(bootstrap):
            y_star = np.exp(log_pred + rng.choice(scaled, size=len(y), replace=True))
            refit = _Problem(form, y_star, n, m).solve(best)
            if refit is not None:
                samples.append([problem.to_params(refit)[k] for k in names])
    if samples:
        table = np.asarray(samples)
        tail = 100.0 * (1.0 - confidence) / 2.0
        lo, hi = np.percentile(table, [tail, 100.0 - tail], axis=0)
        ci = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(names)}
    else:
        ci = {k: (float("nan"), float("nan")) for k in names}
    if bootstrap and len(samples) < bootstrap:
        logger.warning("%d of %d bootstrap refits did not converge", bootstrap - len(samples), bootstrap)
    return ScalingFit(
        form=form, params=params, ci=ci, confidence=confidence, r2_log=r2,
        rmse_log=float(np.sqrt(ss_res / len(y))), n_points=len(y), bootstrap=len(samples),
        _vector=tuple(float(v) for v in best),
    )


def extrapolation_check(
    losses: Sequence[float],
    *,
    n_params: Sequence[float],
    modality_counts: Sequence[float] | None = None,
    seed: int = 0,
) -> dict:
    """Fit on all but the largest model, predict the largest, report the relative error.

    The joint law is used when ``modality_counts`` has at least
    :data:`MIN_DISTINCT` distinct values among the held-in points, else
    ``L(N)``. Returns a dict with ``form``, ``held_out_n_params``, per-point
    ``observed``/``predicted`` losses (nats) and ``relative_error`` (mean of
    ``|predicted - observed| / observed`` over the held-out points).
    Raises ``ValueError`` when the held-in points cannot support a fit.
    """
    y = _positive_finite("losses", losses)
    n = _positive_finite("n_params", n_params)
    if len(n) != len(y):
        raise ValueError(f"n_params has {len(n)} values but losses has {len(y)}")
    m = None if modality_counts is None else _positive_finite("modality_counts", modality_counts)
    largest = n.max()
    held_in = n < largest
    if not held_in.any():
        raise ValueError("extrapolation check needs at least two distinct n_params values")
    use_m = m is not None and len(np.unique(m[held_in])) >= MIN_DISTINCT
    fit = fit_scaling_law(
        y[held_in], n_params=n[held_in],
        modality_counts=m[held_in] if use_m else None, bootstrap=0, seed=seed,
    )
    predicted = fit.predict(n[~held_in], m[~held_in] if use_m else None)
    observed = y[~held_in]
    return {
        "form": fit.form,
        "held_out_n_params": float(largest),
        "fit_points": int(held_in.sum()),
        "observed": [float(v) for v in observed],
        "predicted": [float(v) for v in np.broadcast_to(predicted, observed.shape)],
        "relative_error": float(np.mean(np.abs(predicted - observed) / observed)),
    }


class _Problem:
    """Least squares in log space over a well-conditioned parameter vector.

    Internally N and M are divided by their geometric means (so the
    coefficients are O(loss)) and the coefficients are fitted as logs (so
    they stay positive); :meth:`to_params` maps back to user units.
    """

    def __init__(self, form: str, y: np.ndarray, n: np.ndarray | None, m: np.ndarray | None):
        self.form, self.names, self.y = form, FORMS[form], y
        self.n_ref = float(np.exp(np.mean(np.log(n)))) if n is not None else 1.0
        self.m_ref = float(np.exp(np.mean(np.log(m)))) if m is not None else 1.0
        self.n = n / self.n_ref if n is not None else None
        self.m = m / self.m_ref if m is not None else None
        # E in [0, inf); log-coefficients free; exponents in [0, MAX_EXPONENT].
        lower = {"E": 0.0, "A": -np.inf, "B": -np.inf, "alpha": 0.0, "beta": 0.0}
        upper = {"E": np.inf, "A": np.inf, "B": np.inf, "alpha": MAX_EXPONENT, "beta": MAX_EXPONENT}
        self.bounds = ([lower[k] for k in self.names], [upper[k] for k in self.names])

    def predict(self, theta: np.ndarray) -> np.ndarray:
        p = dict(zip(self.names, theta))
        value = p["E"] + np.zeros_like(self.y)
        if self.n is not None:
            value = value + np.exp(p["A"]) * self.n ** -p["alpha"]
        if self.m is not None:
            value = value + np.exp(p["B"]) * self.m ** -p["beta"]
        return value

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return np.log(self.predict(theta)) - np.log(self.y)

    def solve(self, start: Sequence[float]) -> np.ndarray | None:
        try:
            result = least_squares(self.residuals, np.asarray(start, dtype=float), bounds=self.bounds,
                                   method="trf", x_scale="jac", max_nfev=2000)
        except (ValueError, FloatingPointError):
            return None
        return result.x if result.success and np.all(np.isfinite(result.x)) else None

    def solve_multistart(self) -> np.ndarray:
        """Best of a small grid of starts (power-law fits have local minima in E)."""
        floor = float(self.y.min())
        terms = (1 if self.n is not None else 0) + (1 if self.m is not None else 0)
        best, best_cost = None, np.inf
        for e_frac, exponent in itertools.product((0.0, 0.5, 0.9), (0.1, 0.5, 1.5)):
            # Split what is above E evenly between the power-law terms at the reference point.
            coef = np.log(max(floor * (1.0 - e_frac) / terms, 1e-12))
            start = {"E": floor * e_frac, "A": coef, "B": coef, "alpha": exponent, "beta": exponent}
            theta = self.solve([start[k] for k in self.names])
            if theta is None:
                continue
            cost = float(np.sum(self.residuals(theta) ** 2))
            if cost < best_cost:
                best, best_cost = theta, cost
        if best is None:
            raise ValueError(f"least-squares fit of {_LAW_TEXT[self.form]!r} did not converge from any start")
        return best

    def to_params(self, theta: np.ndarray) -> dict[str, float]:
        p = dict(zip(self.names, (float(v) for v in theta)))
        out = {"E": p["E"]}
        if "alpha" in p:
            # A' (N/N_ref)^-a = A' N_ref^a N^-a  ->  A = A' N_ref^a
            out["A"] = float(np.exp(p["A"] + p["alpha"] * np.log(self.n_ref)))
            out["alpha"] = p["alpha"]
        if "beta" in p:
            out["B"] = float(np.exp(p["B"] + p["beta"] * np.log(self.m_ref)))
            out["beta"] = p["beta"]
        return out


def _positive_finite(label: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{label} is empty")
    bad = ~np.isfinite(array) | (array <= 0)
    if bad.any():
        raise ValueError(
            f"{label} must be finite and > 0; found {', '.join(repr(float(v)) for v in array[bad][:5])} "
            f"at position(s) {', '.join(map(str, np.flatnonzero(bad)[:5]))}"
        )
    return array


def _check_variables(form, n_params, modality_counts, *, length: int | None = None):
    names = FORMS.get(form)
    if names is None:
        raise ValueError(f"unknown scaling-law form {form!r}; expected one of {sorted(FORMS)}")
    if ("alpha" in names and n_params is None) or ("beta" in names and modality_counts is None):
        raise ValueError(f"scaling-law form {form!r} needs {'n_params' if n_params is None else 'modality_counts'}")
    n = _positive_finite("n_params", n_params) if "alpha" in names else None
    m = _positive_finite("modality_counts", modality_counts) if "beta" in names else None
    if length is not None:
        for label, values in (("n_params", n), ("modality_counts", m)):
            if values is not None and len(values) != length:
                raise ValueError(f"{label} has {len(values)} values but losses has {length}")
    return n, m
