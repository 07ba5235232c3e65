"""The scaling-law fit (s2v_core.scaling): recovery, intervals, degenerate input, extrapolation."""

import json
import math

import numpy as np
import pytest

from s2v_core.scaling import extrapolation_check, fit_scaling_law, scaling_law

TRUE = {"E": 1.5, "A": 40.0, "alpha": 0.35, "B": 1.2, "beta": 0.6}
WIDTH_PARAMS = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
MODALITY_COUNTS = np.array([1, 2, 3, 5, 9])


def synthetic_sweep(noise=0.01, seed=1):
    """Losses from TRUE on a 5 x 5 grid with multiplicative log-normal noise."""
    n, m = (a.ravel() for a in np.meshgrid(WIDTH_PARAMS, MODALITY_COUNTS))
    rng = np.random.default_rng(seed)
    losses = scaling_law("NM", TRUE, n, m) * np.exp(rng.normal(0.0, noise, n.size))
    return losses, n, m


def test_joint_fit_recovers_known_exponents_within_their_intervals():
    losses, n, m = synthetic_sweep()
    fit = fit_scaling_law(losses, n_params=n, modality_counts=m, bootstrap=200, seed=0)
    assert fit.form == "NM"
    for name in ("alpha", "beta"):
        lo, hi = fit.ci[name]
        assert lo <= TRUE[name] <= hi, (name, fit.ci[name], fit.params[name])
        assert lo < fit.params[name] < hi
    assert abs(fit.params["alpha"] - TRUE["alpha"]) < 0.05
    assert abs(fit.params["beta"] - TRUE["beta"]) < 0.1
    assert fit.r2_log > 0.99
    assert fit.rmse_log < 0.02
    assert fit.bootstrap == 200


def test_one_variable_forms_recover_their_exponent():
    losses, n, m = synthetic_sweep(noise=0.005)
    at_three = m == 3
    fit_n = fit_scaling_law(losses[at_three], n_params=n[at_three], bootstrap=200)
    assert fit_n.form == "N" and set(fit_n.params) == {"E", "A", "alpha"}
    assert fit_n.ci["alpha"][0] <= TRUE["alpha"] <= fit_n.ci["alpha"][1]

    at_width = n == 1e5
    fit_m = fit_scaling_law(losses[at_width], modality_counts=m[at_width], bootstrap=200)
    assert fit_m.form == "M" and set(fit_m.params) == {"E", "B", "beta"}
    assert fit_m.ci["beta"][0] <= TRUE["beta"] <= fit_m.ci["beta"][1]


def test_fit_is_reproducible_and_serialisable():
    losses, n, m = synthetic_sweep()
    first = fit_scaling_law(losses, n_params=n, modality_counts=m, bootstrap=50, seed=3)
    second = fit_scaling_law(losses, n_params=n, modality_counts=m, bootstrap=50, seed=3)
    assert first.to_dict() == second.to_dict()
    summary = json.loads(json.dumps(first.to_dict()))
    assert summary["law"].startswith("L(N, M)")
    assert np.allclose(first.predict(n, m), scaling_law("NM", first.params, n, m))


def test_noise_free_data_is_fitted_exactly():
    losses, n, m = synthetic_sweep(noise=0.0)
    fit = fit_scaling_law(losses, n_params=n, modality_counts=m, bootstrap=0)
    for name, value in TRUE.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-3)
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in fit.ci.values())


def test_fewer_points_than_parameters_is_a_clear_error():
    losses, n, m = synthetic_sweep()
    with pytest.raises(ValueError, match="5 parameters but only 4 points"):
        fit_scaling_law(losses[:4], n_params=n[:4], modality_counts=m[:4])


def test_too_few_distinct_values_is_a_clear_error():
    with pytest.raises(ValueError, match="n_params has 2 distinct"):
        fit_scaling_law([3.0, 2.5, 3.1, 2.4], n_params=[1e4, 1e5, 1e4, 1e5])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_non_finite_or_non_positive_losses_are_rejected(bad):
    with pytest.raises(ValueError, match="losses must be finite and > 0.*position"):
        fit_scaling_law([3.0, 2.5, bad, 2.0], n_params=[1e3, 1e4, 1e5, 1e6])


def test_mismatched_lengths_and_missing_variables_are_rejected():
    with pytest.raises(ValueError, match="n_params has 3 values but losses has 4"):
        fit_scaling_law([3.0, 2.5, 2.2, 2.0], n_params=[1e3, 1e4, 1e5])
    with pytest.raises(ValueError, match="needs n_params, modality_counts or both"):
        fit_scaling_law([3.0, 2.5, 2.2, 2.0])


def test_extrapolation_to_the_largest_model_is_accurate_on_law_data():
    losses, n, m = synthetic_sweep(noise=0.005)
    check = extrapolation_check(losses, n_params=n, modality_counts=m)
    assert check["form"] == "NM"
    assert check["held_out_n_params"] == WIDTH_PARAMS.max()
    assert check["fit_points"] == 20 and len(check["predicted"]) == 5
    assert check["relative_error"] < 0.05


def test_extrapolation_falls_back_to_the_parameter_law_with_one_modality_count():
    n = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    losses = scaling_law("N", {"E": 1.0, "A": 10.0, "alpha": 0.3}, n)
    check = extrapolation_check(losses, n_params=n, modality_counts=np.full(5, 3))
    assert check["form"] == "N"
    assert check["relative_error"] < 1e-3
    with pytest.raises(ValueError, match="at least two distinct n_params"):
        extrapolation_check([2.0, 2.1], n_params=[1e4, 1e4])
