"""DASH weights: the authors' formula pinned on a hand-computed example (the project's is in test_losses)."""

from __future__ import annotations

import math

import pytest
import torch

from s2v_core.dash import PaperDashConfig, paper_dash_weights

EPS = 1e-6
NAN = float("nan")


def example_meta():
    """Five windows: a missing age, two sites, both sexes, and two windows (0 and 4) of one night."""
    return {
        "age": torch.tensor([40.0, 60.0, NAN, 50.0, 40.0]),
        "sex": torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]),
        "site_id": torch.tensor([1, 1, 2, 2, 1]),
        "night_id": torch.tensor([10, 11, 12, 13, 10]),
    }


def hand_raw():
    """w_raw = clamp(exp(-|Δage|/20) * s, 0, 1) * g + 1e-6, written out entry by entry (diagonal unused)."""
    e1, e05 = math.exp(-1.0), math.exp(-0.5)  # |Δage| of 20 and 10 years
    unknown = EPS  # age missing on either side: k = 0
    return [
        [None, e1 * 0.8 * 1.3 + EPS, unknown, e05 * 0.8 + EPS, 1.0 * 1.3 + EPS],
        [e1 * 0.8 * 1.3 + EPS, None, unknown, e05 * 0.8 * 0.8 + EPS, e1 * 0.8 * 1.3 + EPS],
        [unknown, unknown, None, unknown, unknown],
        [e05 * 0.8 + EPS, e05 * 0.8 * 0.8 + EPS, unknown, None, e05 * 0.8 + EPS],
        [1.0 * 1.3 + EPS, e1 * 0.8 * 1.3 + EPS, unknown, e05 * 0.8 + EPS, None],
    ]


def test_paper_weights_match_the_hand_computed_matrix():
    w, h = paper_dash_weights(example_meta(), example_meta())
    raw = hand_raw()
    same_night = {(0, 4), (4, 0)}
    expected = torch.zeros(5, 5)
    for i in range(5):
        valid = [j for j in range(5) if j != i and (i, j) not in same_night]
        row = [EPS if (i, j) in same_night else raw[i][j] for j in range(5)]
        mean = sum(row[j] for j in valid) / (len(valid) + EPS)
        for j in range(5):
            expected[i, j] = 1.0 if i == j else row[j] / mean
    assert torch.allclose(w, expected, rtol=1e-6, atol=0)
    # Spot values, so that a change in the formula and in this reference together still fails.
    assert w[0, 1].item() == pytest.approx(0.382594 / ((0.382594 + 1e-6 + 0.485225) / 3), rel=1e-5)
    assert w[2, 0].item() == pytest.approx(1.0, rel=1e-5)  # unknown age: every negative alike
    assert w[0, 4].item() == pytest.approx(EPS / ((0.382594 + 1e-6 + 0.485225) / 3), rel=1e-4)
    assert torch.equal(h, torch.tensor([[0, 0, 0, 0, 1], [0] * 5, [0] * 5, [0] * 5, [1, 0, 0, 0, 0]]).float())


def test_rows_are_mean_one_over_other_nights():
    w, _ = paper_dash_weights(example_meta(), example_meta())
    other_night = example_meta()["night_id"][:, None] != example_meta()["night_id"][None, :]
    means = (w * other_night).sum(1) / other_night.sum(1)
    assert torch.allclose(means, torch.ones(5), atol=1e-5)


def test_a_row_without_valid_negative_falls_back_to_its_raw_weights():
    meta = {k: v[[0, 4, 1]] for k, v in example_meta().items()}
    meta["night_id"] = torch.tensor([10, 10, 10])  # one night: no valid negative anywhere
    w, h = paper_dash_weights(meta, meta)
    raw01, raw02 = 1.3 + EPS, math.exp(-1.0) * 0.8 * 1.3 + EPS
    mean = (raw01 + raw02) / (2 + EPS)
    assert w[0, 1].item() == pytest.approx(raw01 / mean, rel=1e-6)
    assert w[0, 2].item() == pytest.approx(raw02 / mean, rel=1e-6)
    assert torch.all(h + torch.eye(3) == 1)


def test_candidates_restrict_the_normalisation_and_sex_or_age_unknown_zeroes_k():
    meta = example_meta()
    meta["sex"] = torch.tensor([0.0, NAN, 0.0, 0.0, 0.0])
    w_all, _ = paper_dash_weights(meta, meta)
    assert w_all[0, 1] < 1e-5  # sex unknown: k = 0, only epsilon remains
    candidates = torch.tensor([True, True, False, True, True])
    w, _ = paper_dash_weights(meta, meta, candidates=candidates)
    other = (meta["night_id"][:, None] != meta["night_id"][None, :]) & candidates[None, :]
    assert torch.allclose((w * other).sum(1) / other.sum(1), torch.ones(5), atol=1e-5)


def test_config_rejects_bad_constants_and_positive_is_required_for_rectangles():
    with pytest.raises(ValueError, match="age_sigma_years"):
        PaperDashConfig(age_sigma_years=0.0)
    with pytest.raises(ValueError, match="same_night_margin"):
        PaperDashConfig(same_night_margin=-0.1)
    meta = example_meta()
    with pytest.raises(ValueError, match="positive="):
        paper_dash_weights({k: v[:2] for k, v in meta.items()}, meta)
