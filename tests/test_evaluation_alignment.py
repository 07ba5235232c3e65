"""Held-out alignment figures: chance levels computed right, an informative encoder above them."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2v_core.evaluation.alignment import AlignmentMeter, plain_pair_loss, retrieval, summarise_pairs
from s2v_core.modalities import MODALITY_KEYS


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_retrieval_is_perfect_for_identical_views_and_chance_for_constant_ones():
    rng = np.random.default_rng(0)
    views = _unit(rng.standard_normal((50, 8)))
    assert retrieval(views, views) == {
        "n": 50.0,
        "top1": 1.0,
        "chance_top1": 1 / 50,
        "top5": 1.0,
        "chance_top5": 5 / 50,
    }
    constant = np.ones((50, 8)) / math.sqrt(8)
    figures = retrieval(constant, constant)
    # Ties are broken at random in expectation: a constant encoder scores exactly chance, not 1.
    assert figures["top1"] == pytest.approx(1 / 50) and figures["top5"] == pytest.approx(5 / 50)
    shuffled = retrieval(views, views[rng.permutation(50)])
    assert shuffled["top1"] < 0.1


def test_constant_embeddings_score_the_chance_loss_exactly():
    z = F.normalize(torch.ones(6, 3, 4), dim=-1)
    nights = torch.tensor([0, 0, 1, 2, 3, 4])  # windows 0 and 1 share a night: not each other's negative
    loss, anchors, log_candidates = plain_pair_loss(z, z, nights, scale=1 / 0.07)
    assert anchors == 2 * 6 * 3
    # Candidates per anchor: 5 for the two windows of night 0, 6 for the others.
    expected = 2 * 3 * (2 * math.log(5) + 4 * math.log(6))
    assert log_candidates == pytest.approx(expected) and loss == pytest.approx(expected, rel=1e-5)


def test_an_encoder_that_shares_information_across_modalities_beats_chance():
    rng = torch.Generator().manual_seed(0)
    latent = torch.randn(64, 5, 16, generator=rng)  # what the two modalities of a window share
    per_modality = {
        "ecg": F.normalize(latent + 0.3 * torch.randn(64, 5, 16, generator=rng), dim=-1),
        "hr": F.normalize(latent + 0.3 * torch.randn(64, 5, 16, generator=rng), dim=-1),
    }
    present = torch.zeros(64, len(MODALITY_KEYS), dtype=torch.bool)
    present[:, [MODALITY_KEYS.index("ecg"), MODALITY_KEYS.index("hr")]] = True
    present[:8, MODALITY_KEYS.index("hr")] = False  # windows without hr are not scored
    meter = AlignmentMeter([("ecg", "hr"), ("eeg", "eog")], scale=10.0)
    for start in range(0, 64, 16):
        rows = slice(start, start + 16)
        meter.add({k: v[rows] for k, v in per_modality.items()}, present[rows], torch.arange(64)[rows])
    figures = meter.result()
    assert set(figures) == {"ecg-hr"}  # no window holds eeg and eog
    ecg_hr = figures["ecg-hr"]
    assert ecg_hr["n"] == 56 and ecg_hr["chance_top1"] == pytest.approx(1 / 56)
    assert ecg_hr["loss_ratio"] < 0.3 and ecg_hr["top1_over_chance"] > 20
    assert summarise_pairs(figures)["loss_ratio_mean"] == pytest.approx(ecg_hr["loss_ratio"])
