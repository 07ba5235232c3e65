"""AHI from per-epoch event detections: runs of positive epochs per hour of sleep, against the scored AHI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2v_core.evaluation.events import NightEvents, ahi_agreement, count_runs, index_from_epochs


def test_count_runs_of_consecutive_positive_epochs():
    assert count_runs(np.array([], dtype=bool)) == 0
    assert count_runs(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)) == 3
    assert count_runs(np.array([0, 0, 0], dtype=bool)) == 0
    assert count_runs(np.ones(5, dtype=bool)) == 1


def test_index_counts_runs_in_sleep_per_hour_of_sleep():
    # 120 epochs = 1 h; the first 20 are wake, so 100 sleep epochs = 5/6 h.
    asleep = np.r_[np.zeros(20, bool), np.ones(100, bool)]
    positive = np.zeros(120, bool)
    positive[[2, 3]] = True  # in wake: not counted
    positive[[30, 31, 50, 70, 71, 72]] = True  # three runs in sleep
    assert index_from_epochs(positive, asleep) == pytest.approx(3 / (100 * 30 / 3600))
    assert index_from_epochs(positive, np.zeros(120, bool)) is None
    with pytest.raises(ValueError, match="differ in shape"):
        index_from_epochs(positive, asleep[:10])


def _night(probability, scored, reference, sleep=True):
    probability = np.asarray(probability, float)
    stages = np.full(probability.size, 2 if sleep else 0)
    return NightEvents(probability, np.asarray(scored, float), stages, reference)


def test_ahi_agreement_of_hand_made_nights():
    # 4 epochs of sleep each = 1/30 h: one run → 30 events/h, two runs → 60 events/h.
    nights = [
        _night([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 0], reference=50.0),  # detects 2 runs → 60/h
        _night([0.9, 0.7, 0.1, 0.1], [1, 0, 0, 0], reference=40.0),  # detects 1 run → 30/h
        _night([0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0], reference=2.0),  # none → 0/h
        _night([0.9, 0.9, 0.9, 0.9], [np.nan] * 4, reference=10.0),  # no scored labels: left out
        _night([0.9, 0.9, 0.9, 0.9], [1, 1, 1, 1], reference=np.nan),  # no reference: left out
        _night([0.9, 0.9, 0.9, 0.9], [1, 1, 1, 1], reference=5.0, sleep=False),  # no sleep: left out
    ]
    report = ahi_agreement(nights)
    assert report["nights"] == 3
    assert report["per_night"] == [[50.0, 60.0, 60.0], [40.0, 30.0, 30.0], [2.0, 0.0, 0.0]]
    assert report["detected"]["mae"] == pytest.approx((10 + 10 + 2) / 3)
    assert report["detected"]["pearson_r"] == pytest.approx(np.corrcoef([50, 40, 2], [60, 30, 0])[0, 1])
    assert report["detected"]["severity_kappa"] == pytest.approx(1.0)  # severe, severe, normal on both sides
    assert report["from_scored_labels"]["pearson_r"] == pytest.approx(report["detected"]["pearson_r"])
    assert ahi_agreement(nights[:1])["nights"] == 1 and "detected" not in ahi_agreement(nights[:1])


def test_night_event_predictions_reassemble_nights_in_window_order():
    """Windows arrive shuffled and from two nights: each night comes back in epoch order, nothing mixed."""
    from s2v_core.evaluation.events import night_event_predictions
    from s2v_core.finetuning import FineTunedModel, FinetuneSpec
    from s2v_core.model import SleepEncoder, batch_to_tensors, model_config

    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=2), ("hr",))
    model = FineTunedModel(encoder, FinetuneSpec(task="events"))
    rng = np.random.default_rng(0)
    rows = 5  # night 7: windows 0, 1, 2; night 9: windows 0, 1
    batch = {
        "hr": rng.normal(size=(rows, 2, 120)).astype(np.float32),
        "present": np.zeros((rows, 9), bool),
        "stages": rng.integers(0, 5, size=(rows, 2)),
        "events": rng.integers(0, 4, size=(rows, 2)),
        "night_id": np.array([7, 7, 7, 9, 9]),
        "window_index": np.array([0, 1, 2, 0, 1]),
        "history": np.array([[11.0], [11.0], [11.0], [3.0], [3.0]], np.float32),
    }
    batch["present"][:, 3] = True  # hr
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(batch_to_tensors(batch))[..., 0]).numpy()
    order = np.array([4, 2, 0, 3, 1])
    shuffled = {k: v[order] for k, v in batch.items()}
    nights = night_event_predictions(
        model, [{k: v[:2] for k, v in shuffled.items()}, {k: v[2:] for k, v in shuffled.items()}]
    )
    by_reference = {n.reference: n for n in nights}
    assert sorted(by_reference) == [3.0, 11.0]
    np.testing.assert_allclose(by_reference[11.0].probability, expected[:3].reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(by_reference[3.0].probability, expected[3:].reshape(-1), rtol=1e-5)
    assert by_reference[11.0].stages.tolist() == batch["stages"][:3].reshape(-1).tolist()
    assert by_reference[3.0].scored.tolist() == (batch["events"][3:].reshape(-1) > 0).astype(float).tolist()


def test_threshold_chosen_on_nights_matches_their_scored_ahi():
    from s2v_core.evaluation.events import choose_threshold

    # A detector that ranks well but is timid: event epochs get 0.3, others 0.1.
    timid = [
        _night([0.3, 0.1, 0.3, 0.1], [1, 0, 1, 0], reference=60.0),  # two runs in 1/30 h
        _night([0.3, 0.1, 0.1, 0.1], [1, 0, 0, 0], reference=30.0),
    ]
    threshold = choose_threshold(timid)
    assert 0.1 <= threshold < 0.3
    assert ahi_agreement(timid, threshold=threshold)["detected"]["mae"] == pytest.approx(0.0)
    assert ahi_agreement(timid)["detected"]["mae"] == pytest.approx(45.0)  # 0.5 detects nothing
    # Every threshold in [0.3, 0.9) fits these nights alike: the one nearest 0.5 wins.
    assert choose_threshold([_night([0.9, 0.1, 0.9, 0.1], [1, 0, 1, 0], reference=60.0)]) == pytest.approx(0.5)
    assert choose_threshold([_night([0.9] * 4, [np.nan] * 4, reference=10.0)]) is None
