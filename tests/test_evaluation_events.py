"""AHI from per-epoch event detections: events in runs of positive epochs per hour of sleep, against the scored AHI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2v_core.evaluation.events import (
    EventCounting,
    NightEvents,
    ahi_agreement,
    choose_counting,
    count_events,
    count_runs,
    index_from_epochs,
    run_lengths,
)


def test_count_runs_of_consecutive_positive_epochs():
    assert count_runs(np.array([], dtype=bool)) == 0
    assert count_runs(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)) == 3
    assert count_runs(np.array([0, 0, 0], dtype=bool)) == 0
    assert count_runs(np.ones(5, dtype=bool)) == 1
    assert run_lengths(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)).tolist() == [2, 1, 3]
    assert run_lengths(np.array([], dtype=bool)).tolist() == []


def test_count_events_gives_each_run_at_least_one_event_and_long_runs_their_rate():
    positive = np.array([1, 0, 0] + [1] * 10 + [0, 1, 1], dtype=bool)  # runs of 1, 10 and 2 epochs
    assert count_events(positive) == 3.0  # rate 0: one event per run
    assert count_events(positive, events_per_epoch=0.6) == pytest.approx(1 + 6 + 1.2)
    assert count_events(positive, events_per_epoch=0.3) == pytest.approx(1 + 3 + 1)  # 2 x 0.3 < 1: one
    assert count_events(np.zeros(4, bool), events_per_epoch=0.6) == 0.0
    with pytest.raises(ValueError, match="events_per_epoch: expected a finite number >= 0, found -0.1"):
        count_events(positive, events_per_epoch=-0.1)
    with pytest.raises(ValueError, match="event threshold: expected a probability in \\[0, 1\\], found 1.5"):
        EventCounting(1.5)


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
    # At 0.5 events per positive epoch the 3-epoch run holds 1.5 events, the 2-epoch runs one each.
    assert index_from_epochs(positive, asleep, events_per_epoch=0.5) == pytest.approx(3.5 / (100 * 30 / 3600))


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
    # A detector that ranks well but is timid: event epochs get 0.3, others 0.1.
    timid = [
        _night([0.3, 0.1, 0.3, 0.1], [1, 0, 1, 0], reference=60.0),  # two runs in 1/30 h
        _night([0.3, 0.1, 0.1, 0.1], [1, 0, 0, 0], reference=30.0),
    ]
    counting = choose_counting(timid)
    assert 0.1 <= counting.threshold < 0.3 and counting.events_per_epoch <= 1.0  # runs of one epoch: rate is moot
    assert ahi_agreement(timid, counting=counting)["detected"]["mae"] == pytest.approx(0.0)
    assert ahi_agreement(timid)["detected"]["mae"] == pytest.approx(45.0)  # 0.5 detects nothing
    # Every threshold in [0.3, 0.9) and every rate up to 1 fit these nights alike: 0.5 and rate 0 win.
    assert choose_counting([_night([0.9, 0.1, 0.9, 0.1], [1, 0, 1, 0], reference=60.0)]) == EventCounting(0.5, 0.0)
    assert choose_counting([_night([0.9] * 4, [np.nan] * 4, reference=10.0)]) is None


def test_rate_fitted_on_dense_nights_counts_what_runs_collapse():
    """Events back to back fill whole stretches of epochs: one run, many events; the fitted rate recovers them."""
    # 120 sleep epochs (1 h). Severe nights: a run of 80 positive epochs holding 48 events (0.6 per epoch);
    # a mild night: 6 isolated one-epoch events.
    severe = _night([0.9] * 80 + [0.1] * 40, [1] * 80 + [0] * 40, reference=48.0)
    mild = _night(([0.9] + [0.1] * 19) * 6, ([1] + [0] * 19) * 6, reference=6.0)
    runs = ahi_agreement([severe, mild])
    assert runs["per_night"] == [[48.0, 1.0, 1.0], [6.0, 6.0, 6.0]]  # one event per run: 1/h for the severe night
    counting = choose_counting([severe, mild])
    assert counting == EventCounting(0.5, 0.6)
    label_counting = choose_counting([severe, mild], labels=True)
    assert label_counting == EventCounting(0.5, 0.6)
    fitted = ahi_agreement([severe, mild], counting=counting, label_counting=label_counting)
    assert fitted["per_night"] == [[48.0, 48.0, 48.0], [6.0, 6.0, 6.0]]
    assert (fitted["events_per_epoch"], fitted["label_events_per_epoch"]) == (0.6, 0.6)
    assert fitted["detected"]["mae"] == pytest.approx(0.0)
