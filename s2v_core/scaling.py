"""Scaling laws of a held-out loss over model size N and modality count M.

Candidate forms (``N`` non-embedding parameters, ``M`` pretraining modalities,
``L`` a held-out loss or error, all > 0):

=================  =====================================================
``additive``       ``L = E + A N^-alpha + B M^-beta``
``multiplicative`` ``L = E + A N^-alpha M^-beta``
``interaction``    ``L = E + A N^-alpha + B M^-beta + C N^-alpha M^-beta``
``saturating``     ``L = E + A N^-alpha + B exp(-beta M)``
``n_only``         ``L = E + A N^-alpha`` (no dependence on M)
``m_only``         ``L = E + B M^-beta`` (no dependence on N)
=================  =====================================================

Fitting is by *variable projection*: for given exponents the law is linear
in its coefficients ``E, A, B, C``, which are solved exactly by non-negative
least squares (:func:`scipy.optimize.nnls`); only the exponents are
searched, on a grid and then refined from the best grid point
(:func:`scipy.optimize.minimize`, bounded Nelder-Mead). Residuals are
relative, ``(L_hat - L) / L``, so a 1 % miss costs the same at every loss
level (first-order equal to log-space residuals).

Every candidate is compared by AIC, BIC and cross-validated residuals
(leave one ``(N, M)`` cell out); the form with the lowest value of the
chosen criterion (BIC by default) is *selected*. Its uncertainty comes from
a cluster bootstrap: the *groups* (seeds, modality subsets; each grouping
factor resampled independently) are drawn with replacement and every point
of a drawn group enters with that multiplicity, so correlated points move
together instead of being treated as independent. A law (over N or over M)
is *identified* when the selected form contains it and the bootstrap 95 %
interval of its exponent excludes 0 (and stays off the search bound).

Pure numpy/scipy: no Ray, no MLflow (those live in ``tune/``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, nnls

logger = logging.getLogger(__name__)

#: Distinct values of a variable needed to identify an offset, a coefficient and an exponent.
MIN_DISTINCT = 3
#: Exponents are searched in [0, MAX_EXPONENT]; an estimate at the bound is not identified.
MAX_EXPONENT = 5.0
#: A coefficient below this fraction of the smallest loss counts as zero (its exponent is then moot).
ZERO_COEFFICIENT = 1e-9
#: Criteria a form can be selected by.
CRITERIA = ("bic", "aic", "cv")


@dataclass(frozen=True)
class Form:
    """A candidate law: which exponents it has and its design matrix for given exponents."""

    name: str
    law: str  # the formula in words, for reports
    exponents: tuple[str, ...]  # searched: "alpha" (over N) and/or "beta" (over M)
    coefficients: tuple[str, ...]  # solved: "E" first, then the terms' coefficients
    uses_n: bool
    uses_m: bool
    # (n_scaled, m_scaled, m_raw, exponents) -> design matrix with one column per coefficient
    design: Callable[..., np.ndarray] = field(repr=False, compare=False)
    # (exponent values, n_ref, m_ref, m_min) -> factor from a scaled coefficient to user units
    units: Callable[..., dict[str, float]] = field(repr=False, compare=False)
    # coefficient names whose term carries each exponent (all zero -> exponent is moot)
    carriers: dict[str, tuple[str, ...]] = field(repr=False, compare=False, default_factory=dict)


def _ones(x: np.ndarray) -> np.ndarray:
    return np.ones_like(x, dtype=float)


FORMS: dict[str, Form] = {
    "additive": Form(
        "additive",
        "L = E + A*N^-alpha + B*M^-beta",
        ("alpha", "beta"),
        ("E", "A", "B"),
        True,
        True,
        lambda n, m, mr, e: np.column_stack([_ones(n), n ** -e[0], m ** -e[1]]),
        lambda e, nr, mr, m0: {"A": nr ** e[0], "B": mr ** e[1]},
        {"alpha": ("A",), "beta": ("B",)},
    ),
    "multiplicative": Form(
        "multiplicative",
        "L = E + A*N^-alpha*M^-beta",
        ("alpha", "beta"),
        ("E", "A"),
        True,
        True,
        lambda n, m, mr, e: np.column_stack([_ones(n), n ** -e[0] * m ** -e[1]]),
        lambda e, nr, mr, m0: {"A": nr ** e[0] * mr ** e[1]},
        {"alpha": ("A",), "beta": ("A",)},
    ),
    "interaction": Form(
        "interaction",
        "L = E + A*N^-alpha + B*M^-beta + C*N^-alpha*M^-beta",
        ("alpha", "beta"),
        ("E", "A", "B", "C"),
        True,
        True,
        lambda n, m, mr, e: np.column_stack([_ones(n), n ** -e[0], m ** -e[1], n ** -e[0] * m ** -e[1]]),
        lambda e, nr, mr, m0: {"A": nr ** e[0], "B": mr ** e[1], "C": nr ** e[0] * mr ** e[1]},
        {"alpha": ("A", "C"), "beta": ("B", "C")},
    ),
    "saturating": Form(
        "saturating",
        "L = E + A*N^-alpha + B*exp(-beta*M)",
        ("alpha", "beta"),
        ("E", "A", "B"),
        True,
        True,
        # exp(-beta (M - M_min)) keeps the column O(1); B is mapped back to exp(-beta M).
        lambda n, m, mr, e: np.column_stack([_ones(n), n ** -e[0], np.exp(-e[1] * (mr - mr.min()))]),
        lambda e, nr, mr, m0: {"A": nr ** e[0], "B": float(np.exp(e[1] * m0))},
        {"alpha": ("A",), "beta": ("B",)},
    ),
    "n_only": Form(
        "n_only",
        "L = E + A*N^-alpha",
        ("alpha",),
        ("E", "A"),
        True,
        False,
        lambda n, m, mr, e: np.column_stack([_ones(n), n ** -e[0]]),
        lambda e, nr, mr, m0: {"A": nr ** e[0]},
        {"alpha": ("A",)},
    ),
    "m_only": Form(
        "m_only",
        "L = E + B*M^-beta",
        ("beta",),
        ("E", "B"),
        False,
        True,
        lambda n, m, mr, e: np.column_stack([_ones(m), m ** -e[0]]),
        lambda e, nr, mr, m0: {"B": mr ** e[0]},
        {"beta": ("B",)},
    ),
}
#: Forms compared by :func:`fit_scaling_laws` when both N and M vary.
JOINT_FORMS = ("additive", "multiplicative", "interaction", "saturating", "n_only", "m_only")


@dataclass(frozen=True)
class LawFit:
    """One form fitted to one set of points.

    Attributes
    ----------
    form : str
        Key of :data:`FORMS`.
    params : dict of str to float
        Coefficients in user units (``E`` in the loss's unit, ``A`` times
        ``N^alpha`` etc.) and the exponents (dimensionless; ``beta`` of the
        saturating form is a rate per modality). An exponent whose term has a
        zero coefficient is reported as 0 (the data show no such dependence).
    rss : float
        Sum of squared relative residuals ``((L_hat - L) / L)^2``.
    n_points : int
    aic, bic : float
        Gaussian information criteria of the relative residuals, counting
        coefficients, exponents and the noise variance.
    rmse : float
        Root-mean-square relative residual (0.01 = 1 %).
    ci : dict of str to (float, float)
        Bootstrap percentile interval of each parameter (empty without a bootstrap).
    confidence : float
    bootstrap : int
        Bootstrap refits that entered ``ci``.
    at_bound : tuple of str
        Exponents whose estimate sits on the search bound ``MAX_EXPONENT``.
    """

    form: str
    params: dict[str, float]
    rss: float
    n_points: int
    aic: float
    bic: float
    rmse: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    confidence: float = 0.95
    bootstrap: int = 0
    at_bound: tuple[str, ...] = ()
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)  # (refits, params) in `names`

    @property
    def law(self) -> str:
        return FORMS[self.form].law

    @property
    def names(self) -> tuple[str, ...]:
        return (*FORMS[self.form].coefficients, *FORMS[self.form].exponents)

    def predict(self, n_params=None, modality_counts=None) -> np.ndarray:
        """Predicted loss at ``n_params`` / ``modality_counts`` (broadcast)."""
        return evaluate_law(self.form, self.params, n_params, modality_counts)

    def predict_interval(self, n_params=None, modality_counts=None) -> tuple[np.ndarray, np.ndarray]:
        """Bootstrap percentile interval of the prediction (``(nan, nan)`` without a bootstrap)."""
        shape = np.broadcast(
            np.asarray(n_params if n_params is not None else 1.0),
            np.asarray(modality_counts if modality_counts is not None else 1.0),
        ).shape
        if self.samples is None or not len(self.samples):
            return np.full(shape, np.nan), np.full(shape, np.nan)
        draws = np.array(
            [evaluate_law(self.form, dict(zip(self.names, row)), n_params, modality_counts) for row in self.samples]
        )
        tail = 100.0 * (1.0 - self.confidence) / 2.0
        lo, hi = np.percentile(draws, [tail, 100.0 - tail], axis=0)
        return lo, hi

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "form": self.form,
            "law": self.law,
            "params": dict(self.params),
            "ci": {k: [lo, hi] for k, (lo, hi) in self.ci.items()},
            "confidence": self.confidence,
            "bootstrap": self.bootstrap,
            "n_points": self.n_points,
            "rss": self.rss,
            "rmse": self.rmse,
            "aic": self.aic,
            "bic": self.bic,
            "at_bound": list(self.at_bound),
        }


def evaluate_law(form: str, params: dict[str, float], n_params=None, modality_counts=None) -> np.ndarray:
    """Evaluate ``form`` with user-unit ``params`` (as in :attr:`LawFit.params`) elementwise."""
    spec = _form(form)
    n = np.asarray(n_params, dtype=float) if spec.uses_n else None
    m = np.asarray(modality_counts, dtype=float) if spec.uses_m else None
    if (spec.uses_n and n_params is None) or (spec.uses_m and modality_counts is None):
        raise ValueError(
            f"scaling-law form {form!r} ({spec.law}) needs "
            f"{'n_params' if spec.uses_n and n_params is None else 'modality_counts'}"
        )
    p = params
    if form == "additive":
        return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * m ** -p["beta"]
    if form == "multiplicative":
        return p["E"] + p["A"] * n ** -p["alpha"] * m ** -p["beta"]
    if form == "interaction":
        return (
            p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * m ** -p["beta"] + p["C"] * n ** -p["alpha"] * m ** -p["beta"]
        )
    if form == "saturating":
        return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * np.exp(-p["beta"] * m)
    if form == "n_only":
        return p["E"] + p["A"] * n ** -p["alpha"]
    return p["E"] + p["B"] * m ** -p["beta"]


# -- one form ------------------------------------------------------------------------------------------


class _Problem:
    """Variable projection for one form on fixed points (with optional row multiplicities)."""

    def __init__(
        self,
        form: str,
        y: np.ndarray,
        n: np.ndarray | None,
        m: np.ndarray | None,
        multiplicity: np.ndarray | None = None,
    ):
        self.spec = _form(form)
        keep = np.ones(len(y), dtype=bool) if multiplicity is None else multiplicity > 0
        self.y = y[keep]
        self.n_ref = float(np.exp(np.mean(np.log(n)))) if n is not None else 1.0
        self.m_ref = float(np.exp(np.mean(np.log(m)))) if m is not None else 1.0
        ones = np.ones(len(self.y))
        self.n = n[keep] / self.n_ref if n is not None else ones
        self.m = m[keep] / self.m_ref if m is not None else ones
        self.m_raw = m[keep] if m is not None else ones
        self.m_min = float(self.m_raw.min())
        mult = np.ones(len(self.y)) if multiplicity is None else multiplicity[keep].astype(float)
        self.row_weight = np.sqrt(mult) / self.y  # relative residuals, each row `mult` times
        self.points = float(mult.sum())

    def coefficients(self, exponents: Sequence[float]) -> tuple[np.ndarray, float]:
        """Non-negative least-squares coefficients (scaled units) and the weighted RSS."""
        design = self.spec.design(self.n, self.m, self.m_raw, np.asarray(exponents, dtype=float))
        with np.errstate(over="ignore", invalid="ignore"):
            a = design * self.row_weight[:, None]
            b = self.y * self.row_weight
        if not np.all(np.isfinite(a)):
            return np.zeros(design.shape[1]), np.inf
        coef, _ = nnls(a, b, maxiter=50 * design.shape[1])
        residual = a @ coef - b
        return coef, float(residual @ residual)

    def profile(self, exponents: Sequence[float]) -> float:
        if np.any(np.asarray(exponents) < 0) or np.any(np.asarray(exponents) > MAX_EXPONENT):
            return np.inf
        return self.coefficients(exponents)[1]

    def solve(self, *, grid: int, starts: Sequence[Sequence[float]] = ()) -> np.ndarray:
        """Exponents minimising the profile: grid search, then refinement from the best grid point(s)."""
        k = len(self.spec.exponents)
        axis = np.concatenate([[0.0], np.geomspace(0.02, MAX_EXPONENT, max(grid - 1, 2))])
        candidates = [np.array(c) for c in itertools.product(axis, repeat=k)]
        costs = np.array([self.profile(c) for c in candidates])
        order = np.argsort(costs)
        seeds = [candidates[i] for i in order[:2]] + [np.asarray(s, dtype=float) for s in starts]
        best, best_cost = candidates[order[0]], costs[order[0]]
        for start in seeds:
            result = minimize(
                self.profile,
                start,
                method="Nelder-Mead",
                bounds=[(0.0, MAX_EXPONENT)] * k,
                options={"xatol": 1e-7, "fatol": 1e-14, "maxiter": 400 * k},
            )
            if np.isfinite(result.fun) and result.fun < best_cost:
                best, best_cost = np.asarray(result.x, dtype=float), float(result.fun)
        if not np.isfinite(best_cost):
            raise ValueError(f"the fit of {self.spec.law!r} failed for every exponent tried")
        return np.clip(best, 0.0, MAX_EXPONENT)

    def to_params(self, exponents: np.ndarray) -> dict[str, float]:
        coef, _ = self.coefficients(exponents)
        units = self.spec.units(exponents, self.n_ref, self.m_ref, self.m_min)
        params = {name: float(value * units.get(name, 1.0)) for name, value in zip(self.spec.coefficients, coef)}
        scale = float(self.y.min())
        for name, value in zip(self.spec.exponents, exponents):
            # A term with no weight says nothing about its exponent: report 0 (no dependence).
            carried = any(
                coef[self.spec.coefficients.index(c)] > ZERO_COEFFICIENT * scale for c in self.spec.carriers[name]
            )
            params[name] = float(value) if carried else 0.0
        return params


def fit_law(
    form: str,
    losses: Sequence[float],
    *,
    n_params: Sequence[float] | None = None,
    modality_counts: Sequence[float] | None = None,
    groups=None,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    grid: int = 24,
) -> LawFit:
    """Fit one form by variable projection; optionally a cluster bootstrap of its parameters.

    Parameters
    ----------
    form : str
        A key of :data:`FORMS`.
    losses : sequence of float
        The fitted figure of each point (> 0, finite; e.g. nats).
    n_params, modality_counts : sequence of float, optional
        N and M of each point (> 0); required when the form uses them.
    groups : array-like, optional
        Bootstrap groups: shape ``(points,)`` or ``(points, factors)`` of
        labels (e.g. seed, modality-subset index); each factor's levels are
        resampled independently. Default (and when every factor has a single
        level): every point is its own group.
    bootstrap : int
        Bootstrap refits (0: no intervals).
    confidence : float
        Coverage of the percentile intervals, in (0, 1).
    seed : int
        Seed of the resampling.
    grid : int
        Grid points per exponent before refinement.

    Returns
    -------
    LawFit

    Raises
    ------
    ValueError
        Unknown form, invalid values, mismatched lengths, fewer points than
        parameters, or fewer than :data:`MIN_DISTINCT` distinct values of a
        variable the form uses.
    """
    spec = _form(form)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), found {confidence}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap: expected an integer >= 0, found {bootstrap}")
    y, n, m = _check_points(spec, losses, n_params, modality_counts)
    labels = _check_groups(groups, len(y))
    problem = _Problem(form, y, n, m)
    exponents = problem.solve(grid=grid)
    params = problem.to_params(exponents)
    rss = problem.coefficients(exponents)[1]
    k = len(spec.coefficients) + len(spec.exponents) + 1  # + noise variance
    size = len(y)
    loglik_term = size * np.log(max(rss, 1e-300) / size)
    at_bound = tuple(
        name
        for name, value in zip(spec.exponents, exponents)
        if value >= MAX_EXPONENT * (1 - 1e-6) and params[name] > 0
    )
    samples = None
    ci: dict[str, tuple[float, float]] = {}
    if bootstrap:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(bootstrap):
            mult = _resample(labels, rng, spec, n, m)
            if mult is None:
                continue
            refit = _Problem(form, y, n, m, multiplicity=mult)
            try:
                # A coarser grid plus a start at the full-data estimate: the refit
                # is near it, the grid guards against a jump to another basin.
                found = refit.solve(grid=max(6, grid // 3), starts=[exponents])
            except ValueError:
                continue
            p = refit.to_params(found)
            rows.append([p[name] for name in (*spec.coefficients, *spec.exponents)])
        if len(rows) < bootstrap:
            logger.warning("%d of %d bootstrap resamples of %s were unusable", bootstrap - len(rows), bootstrap, form)
        if rows:
            samples = np.asarray(rows)
            tail = 100.0 * (1.0 - confidence) / 2.0
            lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
            ci = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate((*spec.coefficients, *spec.exponents))}
    return LawFit(
        form=form,
        params=params,
        rss=rss,
        n_points=size,
        aic=float(loglik_term + 2 * k),
        bic=float(loglik_term + k * np.log(size)),
        rmse=float(np.sqrt(rss / size)),
        ci=ci,
        confidence=confidence,
        bootstrap=0 if samples is None else len(samples),
        at_bound=at_bound,
        samples=samples,
    )


def _resample(labels: np.ndarray, rng: np.random.Generator, spec: Form, n, m, *, tries: int = 50):
    """Row multiplicities of one cluster-bootstrap draw (product over the grouping factors).

    Redrawn (up to ``tries`` times) while a variable the form needs keeps
    fewer than :data:`MIN_DISTINCT` distinct values among the drawn rows.
    """
    for _ in range(tries):
        mult = np.ones(labels.shape[0], dtype=np.int64)
        for column in labels.T:
            levels, index = np.unique(column, return_inverse=True)
            counts = np.bincount(rng.integers(0, len(levels), len(levels)), minlength=len(levels))
            mult *= counts[index]
        drawn = mult > 0
        ok = all(
            values is None or len(np.unique(values[drawn])) >= MIN_DISTINCT
            for values, used in ((n, spec.uses_n), (m, spec.uses_m))
            if used
        )
        if ok and drawn.sum() > len(spec.coefficients) + len(spec.exponents):
            return mult
    return None


def group_multiplicities(groups, *, seed: int = 0) -> np.ndarray:
    """One cluster-bootstrap draw of row multiplicities for ``groups`` (see :func:`fit_law`).

    Rows of one group (in every factor) always get the same multiplicity;
    exposed so that the resampling itself can be tested.
    """
    labels = _check_groups(groups, len(np.asarray(groups)))
    spec = Form("any", "", (), (), False, False, lambda *a: None, lambda *a: {}, {})
    mult = _resample(labels, np.random.default_rng(seed), spec, None, None, tries=1)
    return mult if mult is not None else np.zeros(labels.shape[0], dtype=np.int64)


# -- comparing forms -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether one law (over N: ``alpha``; over M: ``beta``) is identified, and why (in words)."""

    law: str  # "N" or "M"
    exponent: str  # "alpha" or "beta"
    identified: bool
    reason: str
    estimate: float | None = None
    interval: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        return {
            "law": self.law,
            "exponent": self.exponent,
            "identified": self.identified,
            "verdict": ("identified: " if self.identified else "not identified: ") + self.reason,
            "estimate": self.estimate,
            "interval": list(self.interval) if self.interval else None,
        }


@dataclass(frozen=True)
class ScalingAnalysis:
    """Every candidate's fit and scores, the selected form with intervals, and the verdicts."""

    fits: dict[str, LawFit]  # every candidate on all points (the selected one with its bootstrap)
    cv_rmse: dict[str, float]  # leave-one-cell-out relative RMSE per form (nan: no valid fold)
    criterion: str
    selected: str
    verdicts: dict[str, Verdict]  # "N" and "M"
    notes: tuple[str, ...] = ()

    @property
    def best(self) -> LawFit:
        return self.fits[self.selected]

    def ranking(self, criterion: str) -> list[str]:
        """Forms ordered best first by ``criterion`` (bic, aic or cv)."""
        score = {
            "bic": lambda f: self.fits[f].bic,
            "aic": lambda f: self.fits[f].aic,
            "cv": lambda f: _nan_last(self.cv_rmse.get(f, np.nan)),
        }[criterion]
        return sorted(self.fits, key=score)

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "selected": self.selected,
            "law": FORMS[self.selected].law,
            "selected_by": {c: self.ranking(c)[0] for c in CRITERIA},
            "forms": {name: {**fit.to_dict(), "cv_rmse": self.cv_rmse.get(name)} for name, fit in self.fits.items()},
            "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()},
            "notes": list(self.notes),
        }


def fit_scaling_laws(
    losses: Sequence[float],
    *,
    n_params: Sequence[float],
    modality_counts: Sequence[float],
    groups=None,
    forms: Sequence[str] = JOINT_FORMS,
    criterion: str = "bic",
    bootstrap: int = 200,
    confidence: float = 0.95,
    cross_validate: bool = True,
    seed: int = 0,
    grid: int = 24,
) -> ScalingAnalysis:
    """Fit every candidate form, select one, bootstrap it, and say which laws are identified.

    Parameters
    ----------
    losses, n_params, modality_counts : sequence of float
        One value per trial (see :func:`fit_law`).
    groups : array-like, optional
        Bootstrap groups (see :func:`fit_law`), e.g. ``np.column_stack([seed, subset])``.
    forms : sequence of str
        Candidates (keys of :data:`FORMS`); a form the points cannot support
        (too few distinct values, too few points) is left out with a note.
    criterion : {"bic", "aic", "cv"}
        What selects the form; all three are reported either way.
    bootstrap, confidence, seed, grid
        As in :func:`fit_law` (the bootstrap runs for the selected form only).
    cross_validate : bool
        Compute the leave-one-``(N, M)``-cell-out relative RMSE of every form.

    Returns
    -------
    ScalingAnalysis
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {', '.join(CRITERIA)}, found {criterion!r}")
    if criterion == "cv" and not cross_validate:
        raise ValueError("criterion 'cv' needs cross_validate=True")
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise ValueError(f"forms: expected some of {', '.join(FORMS)}, found {list(forms)}")
    y = _positive_finite("losses", losses)
    n = _positive_finite("n_params", n_params)
    m = _positive_finite("modality_counts", modality_counts)
    for label, values in (("n_params", n), ("modality_counts", m)):
        if len(values) != len(y):
            raise ValueError(f"{label} has {len(values)} values but losses has {len(y)}")
    labels = _check_groups(groups, len(y))
    fits: dict[str, LawFit] = {}
    notes = []
    for name in forms:
        try:
            fits[name] = fit_law(name, y, n_params=n, modality_counts=m, grid=grid)
        except ValueError as error:
            notes.append(f"{name} not fitted: {error}")
    if not fits:
        raise ValueError("no candidate form could be fitted: " + "; ".join(notes))
    cv = {
        name: cross_validated_rmse(name, y, n, m, grid=max(8, grid // 2)) if cross_validate else float("nan")
        for name in fits
    }
    ranked = sorted(
        fits,
        key={"bic": lambda f: fits[f].bic, "aic": lambda f: fits[f].aic, "cv": lambda f: _nan_last(cv[f])}[criterion],
    )
    selected = ranked[0]
    if bootstrap:
        fits[selected] = fit_law(
            selected,
            y,
            n_params=n,
            modality_counts=m,
            groups=labels,
            bootstrap=bootstrap,
            confidence=confidence,
            seed=seed,
            grid=grid,
        )
    by = {"bic": min(fits, key=lambda f: fits[f].bic), "aic": min(fits, key=lambda f: fits[f].aic)}
    if cross_validate:
        by["cv"] = min(fits, key=lambda f: _nan_last(cv[f]))
    disagree = sorted({c for c, f in by.items() if f != selected})
    if disagree:
        notes.append(f"{criterion} selects {selected}; " + ", ".join(f"{c} selects {by[c]}" for c in disagree))
    verdicts = {
        law: _verdict(law, fits[selected], criterion, distinct)
        for law, distinct in (("N", len(np.unique(n))), ("M", len(np.unique(m))))
    }
    return ScalingAnalysis(
        fits=fits, cv_rmse=cv, criterion=criterion, selected=selected, verdicts=verdicts, notes=tuple(notes)
    )


def cross_validated_rmse(form: str, losses, n_params, modality_counts, *, grid: int = 12) -> float:
    """Leave-one-``(N, M)``-cell-out RMS relative error of ``form`` (nan when no fold can be fitted).

    Each fold holds out every point (seed, subset) of one design cell, so the
    score measures prediction of an unseen configuration, not of a repeat.
    """
    spec = _form(form)
    y, n, m = (np.asarray(v, dtype=float) for v in (losses, n_params, modality_counts))
    cells = np.unique(np.column_stack([n, m]), axis=0)
    errors = []
    for cell in cells:
        held = (n == cell[0]) & (m == cell[1])
        train = ~held
        try:
            fit = fit_law(
                form,
                y[train],
                n_params=n[train] if spec.uses_n else None,
                modality_counts=m[train] if spec.uses_m else None,
                grid=grid,
            )
        except ValueError:
            continue
        predicted = fit.predict(n[held], m[held])
        errors.append((predicted - y[held]) / y[held])
    if not errors:
        return float("nan")
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def _verdict(law: str, fit: LawFit, criterion: str, distinct: int) -> Verdict:
    exponent = "alpha" if law == "N" else "beta"
    spec = FORMS[fit.form]
    what = "parameters N" if law == "N" else "modality count M"
    if distinct < MIN_DISTINCT:
        return Verdict(
            law, exponent, False, f"only {distinct} distinct value(s) of {what}; at least {MIN_DISTINCT} are needed"
        )
    if exponent not in spec.exponents:
        return Verdict(
            law,
            exponent,
            False,
            f"the form selected by {criterion} ({fit.form}: {spec.law}) has no "
            f"{what} term; the data do not support a dependence on it",
        )
    estimate = fit.params[exponent]
    if not fit.ci:
        return Verdict(law, exponent, False, "no bootstrap interval was computed", estimate)
    lo, hi = fit.ci[exponent]
    interval = (lo, hi)
    pct = f"{100 * fit.confidence:g} %"
    if hi - lo <= 1e-9 * max(1.0, abs(estimate)):
        return Verdict(
            law,
            exponent,
            False,
            f"the bootstrap interval of {exponent} has zero width ({fit.bootstrap} "
            "refits that all agree): too few groups to resample",
            estimate,
            interval,
        )
    if exponent in fit.at_bound or hi >= MAX_EXPONENT * (1 - 1e-6):
        return Verdict(
            law,
            exponent,
            False,
            f"{exponent} reaches the search bound {MAX_EXPONENT:g} ({pct} interval [{lo:.3g}, {hi:.3g}])",
            estimate,
            interval,
        )
    if estimate <= 0:
        return Verdict(
            law,
            exponent,
            False,
            f"the {what} term has a zero coefficient in the selected form ({fit.form})",
            estimate,
            interval,
        )
    if lo <= 0:
        return Verdict(
            law,
            exponent,
            False,
            f"the {pct} interval of {exponent}, [{lo:.3g}, {hi:.3g}], includes 0",
            estimate,
            interval,
        )
    return Verdict(
        law,
        exponent,
        True,
        f"{exponent} = {estimate:.3g}, {pct} interval [{lo:.3g}, {hi:.3g}] "
        f"excludes 0, in the {fit.form} form selected by {criterion}",
        estimate,
        interval,
    )


# -- extrapolation -------------------------------------------------------------------------------------


def held_out_forecast(
    losses: Sequence[float],
    *,
    n_params: Sequence[float],
    modality_counts: Sequence[float],
    targets_n: Sequence[float],
    targets_m: Sequence[float],
    axis: str,
    groups=None,
    forms: Sequence[str] = JOINT_FORMS,
    criterion: str = "bic",
    bootstrap: int = 100,
    seed: int = 0,
) -> dict:
    """Forecast held-out cells from the points *below* them on one axis, before they are run.

    ``losses``/``n_params``/``modality_counts`` are the points already
    measured (none of them at a target cell); ``targets_n``/``targets_m``
    the cells to forecast. The law is selected and fitted on the measured
    points (:func:`fit_scaling_laws`) and the *no-scaling* forecast is the
    mean measured loss at the largest value of ``axis`` (``"n"`` or
    ``"m"``) below the target, same value on the other axis. Returns a
    JSON-ready dict: ``form``, ``law``, ``params``, per target ``n_params``,
    ``modality_count``, ``predicted`` (with ``interval``) and ``no_scaling``.
    """
    if axis not in ("n", "m"):
        raise ValueError(f"axis: expected 'n' or 'm', found {axis!r}")
    y = _positive_finite("losses", losses)
    n = _positive_finite("n_params", n_params)
    m = _positive_finite("modality_counts", modality_counts)
    tn = _positive_finite("targets_n", targets_n)
    tm = _positive_finite("targets_m", targets_m)
    if len(tn) != len(tm):
        raise ValueError(f"targets_n has {len(tn)} values but targets_m has {len(tm)}")
    analysis = fit_scaling_laws(
        y,
        n_params=n,
        modality_counts=m,
        groups=groups,
        forms=forms,
        criterion=criterion,
        bootstrap=bootstrap,
        seed=seed,
        cross_validate=criterion == "cv",
    )
    fit = analysis.best
    lo, hi = fit.predict_interval(tn, tm)
    predicted = np.broadcast_to(fit.predict(tn, tm), tn.shape)
    rows = []
    for i, (tn_i, tm_i) in enumerate(zip(tn, tm)):
        same = m == tm_i if axis == "n" else n == tn_i
        along = n if axis == "n" else m
        below = same & (along < (tn_i if axis == "n" else tm_i))
        naive = float(np.mean(y[below & (along == along[below].max())])) if below.any() else None
        rows.append(
            {
                "n_params": float(tn_i),
                "modality_count": float(tm_i),
                "predicted": float(predicted[i]),
                "interval": [float(lo[i]), float(hi[i])],
                "no_scaling": naive,
            }
        )
    return {
        "axis": axis,
        "form": fit.form,
        "law": fit.law,
        "params": fit.params,
        "fit_points": len(y),
        "verdicts": {k: v.to_dict() for k, v in analysis.verdicts.items()},
        "targets": rows,
    }


def score_forecast(forecast: dict, observed: dict[tuple[float, float], float]) -> dict:
    """Relative errors of a :func:`held_out_forecast` against the measured losses.

    ``observed`` maps ``(n_params, modality_count)`` to the measured loss
    (mean over seeds). Returns ``relative_error`` (mean over targets of
    ``|predicted - observed| / observed``), ``no_scaling_relative_error``
    (over the targets that have a no-scaling forecast), the law's error on
    those same targets, ``beats_no_scaling`` (compared on them), and one row
    per target.
    """
    rows, law, naive, matched = [], [], [], []
    for target in forecast["targets"]:
        key = (target["n_params"], target["modality_count"])
        value = observed.get(key)
        row = {**target, "observed": value}
        if value is not None and value > 0:
            row["relative_error"] = abs(target["predicted"] - value) / value
            law.append(row["relative_error"])
            if target["no_scaling"] is not None:
                row["no_scaling_relative_error"] = abs(target["no_scaling"] - value) / value
                naive.append(row["no_scaling_relative_error"])
                matched.append(row["relative_error"])
        rows.append(row)
    out = {
        "targets": rows,
        "scored": len(law),
        "relative_error": float(np.mean(law)) if law else None,
        "no_scaling_relative_error": float(np.mean(naive)) if naive else None,
        # the law on the same targets as the no-scaling forecast (a corner cell has none)
        "relative_error_where_no_scaling": float(np.mean(matched)) if matched else None,
    }
    out["beats_no_scaling"] = (
        None if not matched else out["relative_error_where_no_scaling"] < out["no_scaling_relative_error"]
    )
    return out


# -- validation helpers --------------------------------------------------------------------------------


def _form(name: str) -> Form:
    if name not in FORMS:
        raise ValueError(f"unknown scaling-law form {name!r}; expected one of {', '.join(FORMS)}")
    return FORMS[name]


def _nan_last(value: float) -> float:
    return value if np.isfinite(value) else np.inf


def _positive_finite(label: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{label} is empty")
    bad = ~np.isfinite(array) | (array <= 0)
    if bad.any():
        raise ValueError(
            f"{label}: expected finite values > 0, found {', '.join(repr(float(v)) for v in array[bad][:5])} "
            f"at position(s) {', '.join(map(str, np.flatnonzero(bad)[:5]))}"
        )
    return array


def _check_points(spec: Form, losses, n_params, modality_counts):
    y = _positive_finite("losses", losses)
    for label, values, used in (("n_params", n_params, spec.uses_n), ("modality_counts", modality_counts, spec.uses_m)):
        if used and values is None:
            raise ValueError(f"scaling-law form {spec.name!r} ({spec.law}) needs {label}")
    n = _positive_finite("n_params", n_params) if spec.uses_n else None
    m = _positive_finite("modality_counts", modality_counts) if spec.uses_m else None
    for label, values in (("n_params", n), ("modality_counts", m)):
        if values is None:
            continue
        if len(values) != len(y):
            raise ValueError(f"{label} has {len(values)} values but losses has {len(y)}")
        distinct = np.unique(values)
        if len(distinct) < MIN_DISTINCT:
            raise ValueError(
                f"{label} has {len(distinct)} distinct value(s) "
                f"({', '.join(f'{v:g}' for v in distinct)}); at least {MIN_DISTINCT} are needed "
                "to identify an offset, a coefficient and an exponent"
            )
    k = len(spec.coefficients) + len(spec.exponents)
    if len(y) <= k:
        raise ValueError(
            f"scaling-law form {spec.name!r} ({spec.law}) has {k} parameters but only {len(y)} "
            "points were given; run more trials"
        )
    return y, n, m


def _check_groups(groups, size: int) -> np.ndarray:
    """Labels ``(points, factors)`` as strings; a factor with a single level cannot be resampled and is
    dropped, and with no factor left every point is its own group (a plain case bootstrap)."""
    if groups is None:
        return np.arange(size).reshape(-1, 1)
    labels = np.asarray(groups, dtype=object)
    if labels.ndim == 1:
        labels = labels.reshape(-1, 1)
    if labels.ndim != 2 or labels.shape[0] != size:
        raise ValueError(f"groups: expected {size} rows (one per point), found shape {np.shape(groups)}")
    # Labels as strings so that mixed types sort; np.unique needs one type.
    labels = np.vectorize(str, otypes=[object])(labels).astype(str)
    varying = [j for j in range(labels.shape[1]) if len(np.unique(labels[:, j])) > 1]
    if not varying:
        logger.warning(
            "every bootstrap group factor has a single level (one seed, one subset): "
            "resampling points instead, which treats them as independent"
        )
        return np.arange(size).reshape(-1, 1)
    return labels[:, varying]
