"""The scaling-law fit (s2v_core.scaling): recovery, selection, intervals, verdicts, extrapolation."""

import json

import numpy as np
import pytest

from s2v_core.scaling import (
    FORMS,
    MAX_EXPONENT,
    cross_validated_rmse,
    evaluate_law,
    fit_law,
    fit_scaling_laws,
    group_multiplicities,
    held_out_forecast,
    score_forecast,
)

N_GRID = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
M_GRID = np.array([2, 3, 5, 7, 9])
LAWS = {
    "additive": {"E": 1.5, "A": 40.0, "alpha": 0.35, "B": 1.2, "beta": 0.6},
    "multiplicative": {"E": 1.5, "A": 40.0, "alpha": 0.35, "beta": 0.6},
    "saturating": {"E": 1.5, "A": 40.0, "alpha": 0.35, "B": 2.0, "beta": 0.5},
    "n_only": {"E": 1.5, "A": 40.0, "alpha": 0.35},
}
GRID = 12  # coarse exponent grid: the refinement does the rest, and tests stay cheap


def sweep_points(form, *, noise=0.01, seeds=3, seed=0):
    """Losses of ``form`` on the 5 x 5 grid, ``seeds`` repeats, multiplicative log-normal noise per seed."""
    rng = np.random.default_rng(seed)
    n, m, s = (a.ravel() for a in np.meshgrid(N_GRID, M_GRID, np.arange(seeds), indexing="ij"))
    y = evaluate_law(form, LAWS[form], n, m) * np.exp(rng.normal(0.0, noise, n.size))
    return y, n, m, s


def test_noise_free_points_are_fitted_exactly_by_variable_projection():
    y, n, m, _ = sweep_points("additive", noise=0.0, seeds=1)
    fit = fit_law("additive", y, n_params=n, modality_counts=m, grid=GRID)
    for name, value in LAWS["additive"].items():
        assert fit.params[name] == pytest.approx(value, rel=1e-3), name
    assert fit.rmse < 1e-6
    assert np.allclose(fit.predict(n, m), y, rtol=1e-6)


@pytest.mark.parametrize("form", ["additive", "multiplicative", "saturating"])
def test_noisy_points_recover_exponents_and_offset(form):
    y, n, m, _ = sweep_points(form, noise=0.005, seed=3)
    fit = fit_law(form, y, n_params=n, modality_counts=m, grid=GRID)
    truth = LAWS[form]
    assert abs(fit.params["alpha"] - truth["alpha"]) < 0.03
    assert abs(fit.params["beta"] - truth["beta"]) < 0.12
    assert fit.params["E"] == pytest.approx(truth["E"], rel=0.1)
    assert fit.rmse < 0.01


@pytest.mark.parametrize("form", ["additive", "multiplicative", "saturating", "n_only"])
def test_model_selection_picks_the_generating_form(form):
    y, n, m, s = sweep_points(form, noise=0.01, seed=1)
    analysis = fit_scaling_laws(y, n_params=n, modality_counts=m, groups=s, bootstrap=0, grid=GRID)
    assert analysis.selected == form
    assert set(analysis.fits) == set(FORMS)
    # every criterion is reported for every form, and the CV errors are finite
    assert all(np.isfinite(analysis.cv_rmse[f]) for f in analysis.fits)
    # CV cannot tell a form from one that nests it (interaction nests additive), but
    # the generating form predicts unseen cells about as well as the best one.
    assert analysis.cv_rmse[form] <= 1.1 * min(analysis.cv_rmse.values())


def test_selected_form_is_bootstrapped_and_verdicts_say_identified():
    y, n, m, s = sweep_points("additive", noise=0.01, seeds=4, seed=2)
    analysis = fit_scaling_laws(y, n_params=n, modality_counts=m, groups=s, bootstrap=60, grid=GRID)
    best = analysis.best
    assert best.form == "additive" and best.bootstrap > 50
    for name in ("alpha", "beta"):
        lo, hi = best.ci[name]
        assert 0 < lo <= LAWS["additive"][name] <= hi
    assert analysis.verdicts["N"].identified and analysis.verdicts["M"].identified
    summary = json.loads(json.dumps(analysis.to_dict()))
    assert summary["verdicts"]["N"]["verdict"].startswith("identified: alpha")
    assert set(summary["selected_by"]) == {"bic", "aic", "cv"}


def test_no_dependence_on_m_is_not_identified_and_says_why():
    y, n, m, s = sweep_points("n_only", noise=0.01, seed=4)
    analysis = fit_scaling_laws(y, n_params=n, modality_counts=m, groups=s, bootstrap=30, grid=GRID)
    verdict = analysis.verdicts["M"]
    assert not verdict.identified
    assert "no modality count M term" in verdict.reason or "includes 0" in verdict.reason
    assert analysis.verdicts["N"].identified


def test_exponent_of_a_flat_axis_has_an_interval_that_includes_zero():
    # The additive form forced onto data without an M effect: B's term is zero in
    # most resamples, its exponent then reported as 0, so the interval reaches 0.
    y, n, m, s = sweep_points("n_only", noise=0.01, seeds=6, seed=5)
    fit = fit_law("additive", y, n_params=n, modality_counts=m, groups=s, bootstrap=40, grid=GRID)
    assert fit.ci["beta"][0] == 0.0
    assert fit.ci["alpha"][0] > 0.2


def test_intervals_cover_the_truth_in_most_replicates():
    covered = []
    for replicate in range(10):
        y, n, m, s = sweep_points("additive", noise=0.02, seeds=5, seed=100 + replicate)
        fit = fit_law("additive", y, n_params=n, modality_counts=m, groups=s, bootstrap=40, grid=GRID, seed=replicate)
        covered.append(fit.ci["alpha"][0] <= LAWS["additive"]["alpha"] <= fit.ci["alpha"][1])
    # 95 % intervals from 5 groups are somewhat narrow; 7 of 10 guards against gross undercoverage.
    assert sum(covered) >= 7, covered


def test_cluster_bootstrap_moves_whole_groups():
    seeds = np.repeat(np.arange(4), 6)
    subsets = np.tile(np.repeat(np.arange(2), 3), 4)
    for draw in range(5):
        mult = group_multiplicities(np.column_stack([seeds, subsets]), seed=draw)
        for level in range(4):
            for subset in range(2):
                rows = mult[(seeds == level) & (subsets == subset)]
                assert len(set(rows.tolist())) == 1  # one multiplicity per (seed, subset) cell
        assert mult.sum() == len(seeds)  # 4 seeds x 2 subsets drawn: total weight is preserved


def test_a_single_seed_falls_back_to_resampling_points():
    y, n, m, s = sweep_points("additive", noise=0.01, seeds=1, seed=9)
    fit = fit_law("additive", y, n_params=n, modality_counts=m, groups=np.column_stack([s, s]), bootstrap=20, grid=GRID)
    # One group would give 20 identical refits (a zero-width interval); points give a real spread.
    assert fit.ci["alpha"][1] - fit.ci["alpha"][0] > 1e-4
    multiplicities = group_multiplicities(np.zeros(6), seed=0)
    assert multiplicities.sum() == 6 and multiplicities.max() > 1


def test_a_zero_width_interval_is_not_identified():
    from s2v_core.scaling import LawFit, _verdict

    fit = LawFit(
        form="n_only",
        params={"E": 1.0, "A": 2.0, "alpha": 0.3},
        rss=0.0,
        n_points=9,
        aic=0.0,
        bic=0.0,
        rmse=0.0,
        ci={"E": (1.0, 1.0), "A": (2.0, 2.0), "alpha": (0.3, 0.3)},
        bootstrap=10,
    )
    verdict = _verdict("N", fit, "bic", distinct=3)
    assert not verdict.identified and "zero width" in verdict.reason


def test_one_variable_forms_need_only_their_variable():
    y, n, _m, _ = sweep_points("n_only", noise=0.005, seed=6)
    fit = fit_law("n_only", y, n_params=n, grid=GRID)
    assert fit.params["alpha"] == pytest.approx(0.35, abs=0.03)
    with pytest.raises(ValueError, match="needs modality_counts"):
        fit_law("additive", y, n_params=n)


def test_cross_validation_prefers_the_true_form_over_a_wrong_one():
    y, n, m, _ = sweep_points("multiplicative", noise=0.01, seeds=1, seed=7)
    right = cross_validated_rmse("multiplicative", y, n, m, grid=GRID)
    wrong = cross_validated_rmse("additive", y, n, m, grid=GRID)
    assert right < wrong


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"losses": [1.0, 2.0, 3.0, 4.0, 5.0], "n_params": [1, 2, 3, 4, 5]}, "needs modality_counts"),
        ({"losses": [1.0, 2.0, -3.0, 4.0, 5.0], "n_params": [1, 2, 3, 4, 5]}, "losses: expected finite"),
        ({"losses": [1.0, 2.0, 3.0, 4.0], "n_params": [1, 2, 3]}, "n_params has 3 values but losses has 4"),
        ({"losses": [1.0, 2.0, 3.0, 4.0], "n_params": [1, 1, 2, 2]}, "2 distinct value"),
        ({"losses": [1.0, 2.0, 3.0], "n_params": [1, 2, 3]}, "only 3 points"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    form = "additive" if "needs modality_counts" in message else "n_only"
    with pytest.raises(ValueError, match=message):
        fit_law(form, kwargs["losses"], n_params=kwargs["n_params"])


def test_unknown_form_criterion_and_group_shape_are_rejected():
    y, n, m, _s = sweep_points("additive", seeds=1)
    with pytest.raises(ValueError, match="unknown scaling-law form 'power'"):
        fit_law("power", y, n_params=n, modality_counts=m)
    with pytest.raises(ValueError, match="criterion: expected one of bic, aic, cv"):
        fit_scaling_laws(y, n_params=n, modality_counts=m, criterion="r2")
    with pytest.raises(ValueError, match="groups: expected 25 rows"):
        fit_law("additive", y, n_params=n, modality_counts=m, groups=[0, 1], bootstrap=2)


def test_exponent_at_the_search_bound_is_not_identified():
    # A term that falls off faster than the bound allows: only the smallest N differs.
    n = np.repeat([1e3, 1e4, 1e5, 1e6], 3)
    m = np.tile([2, 4, 8], 4)
    y = 1.0 + 0.5 * m**-0.5 + np.where(n == 1e3, 0.5, 0.0)
    analysis = fit_scaling_laws(
        y, n_params=n, modality_counts=m, forms=("additive",), bootstrap=10, grid=GRID, cross_validate=False
    )
    assert analysis.best.params["alpha"] == pytest.approx(MAX_EXPONENT)
    assert not analysis.verdicts["N"].identified
    assert "search bound" in analysis.verdicts["N"].reason


def test_held_out_forecast_uses_the_smaller_models_and_beats_no_scaling():
    y, n, m, s = sweep_points("additive", noise=0.005, seed=8)
    largest = n == n.max()
    forecast = held_out_forecast(
        y[~largest],
        n_params=n[~largest],
        modality_counts=m[~largest],
        targets_n=np.full(len(M_GRID), n.max()),
        targets_m=M_GRID,
        axis="n",
        groups=s[~largest],
        bootstrap=20,
        forms=("additive", "n_only", "m_only"),
    )
    assert forecast["fit_points"] == int((~largest).sum())
    observed = {(float(n.max()), float(c)): float(np.mean(y[largest & (m == c)])) for c in M_GRID}
    scored = score_forecast(forecast, observed)
    assert scored["scored"] == len(M_GRID)
    assert scored["relative_error"] < 0.02
    assert scored["beats_no_scaling"] is True
    truth = evaluate_law("additive", LAWS["additive"], n.max(), M_GRID)
    lows = np.array([t["interval"][0] for t in forecast["targets"]])
    assert np.all(lows < truth * 1.02)


def test_held_out_forecast_along_m_uses_the_next_smaller_count_as_no_scaling():
    y, n, m, _s = sweep_points("additive", noise=0.0, seeds=1)
    keep = m < 9
    forecast = held_out_forecast(
        y[keep],
        n_params=n[keep],
        modality_counts=m[keep],
        targets_n=N_GRID,
        targets_m=np.full(len(N_GRID), 9.0),
        axis="m",
        bootstrap=0,
        forms=("additive",),
    )
    for target, width in zip(forecast["targets"], N_GRID):
        assert target["no_scaling"] == pytest.approx(float(y[(n == width) & (m == 7)][0]))
        assert target["predicted"] == pytest.approx(
            float(evaluate_law("additive", LAWS["additive"], width, 9)), rel=1e-3
        )


def test_forecast_score_compares_with_no_scaling_on_the_same_targets():
    forecast = {
        "targets": [
            {"n_params": 1e6, "modality_count": 2.0, "predicted": 2.0, "interval": [1.9, 2.1], "no_scaling": 2.4},
            {"n_params": 1e6, "modality_count": 9.0, "predicted": 1.0, "interval": [0.9, 1.1], "no_scaling": None},
        ]
    }
    scored = score_forecast(forecast, {(1e6, 2.0): 2.0, (1e6, 9.0): 2.0})
    assert scored["scored"] == 2
    assert scored["relative_error"] == pytest.approx(0.25)  # (0 + 0.5) / 2
    assert scored["no_scaling_relative_error"] == pytest.approx(0.2)
    assert scored["relative_error_where_no_scaling"] == 0.0 and scored["beats_no_scaling"] is True
    unobserved = score_forecast(forecast, {})
    assert unobserved["scored"] == 0 and unobserved["beats_no_scaling"] is None
