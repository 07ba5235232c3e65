"""The task table: stage mappings, metrics on hand-made examples, losses against loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s2v_core.evaluation.tasks import (
    TASKS,
    Task,
    concordance_index,
    cox_partial_likelihood,
    get_task,
    icc,
    map_stages,
    night_targets,
    pearson_r,
    severity_classes,
    severity_kappa,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; ICC(2,1) = 0.29.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])


def test_stage_mappings():
    stages = np.array([0, 1, 2, 3, 4, -1])
    assert map_stages(stages, TASKS["staging"].stage_map).tolist() == [0, 1, 2, 3, 4, -1]
    assert TASKS["staging4"].stage_targets(stages).tolist() == [0, 1, 1, 2, 3, -1]
    assert TASKS["staging3"].stage_targets(stages).tolist() == [0, 1, 1, 1, 2, -1]
    assert TASKS["staging4"].classes == ("W", "light", "deep", "REM")
    assert TASKS["staging3"].outputs == 3


def test_stage_mapping_rejects_bad_codes():
    with pytest.raises(ValueError, match=r"-1\.\.4, found \[5\]"):
        map_stages(np.array([0, 5]), TASKS["staging"].stage_map)


def test_task_rejects_a_stage_map_that_skips_a_class():
    with pytest.raises(ValueError, match="stage_map"):
        Task("bad", "epoch", "classification", ("stages",), classes=("a", "b", "c"), stage_map=(0, 0, 0, 0, 2))


def test_get_task_table_and_families():
    assert get_task("staging").kind == "classification"
    outcome = get_task("outcome:hypertension")
    assert (outcome.kind, outcome.columns, outcome.level) == ("binary", ("hypertension",), "night")
    scored = get_task("ahi:ahi_scored")
    assert (scored.kind, scored.columns, scored.unit) == ("regression", ("ahi_scored",), "events/h")
    assert "severity_kappa" in scored.metrics(np.array([3.0, 20.0]), np.array([4.0, 18.0]))
    survival = get_task("survival:death, time_to_death")
    assert survival.columns == ("death", "time_to_death")
    with pytest.raises(ValueError, match="survival:EVENT,TIME"):
        get_task("survival:death")
    with pytest.raises(ValueError, match="expected one of staging"):
        get_task("stageing")


def test_classification_metrics_of_a_hand_made_3_class_example():
    task = TASKS["staging3"]
    target = np.array([0, 0, 1, 1, 1, 2, -1])
    logits = np.eye(3)[[0, 1, 1, 1, 2, 2, 0]]  # two errors: W→NREM, NREM→REM; the unknown epoch is ignored
    figures = task.metrics(target, logits)
    assert figures["confusion"] == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert figures["accuracy"] == pytest.approx(4 / 6)
    # per-class F1: W 2·1/(2+1)=2/3, NREM 2·2/(3+3)=2/3, REM 2·1/(1+2)=2/3
    assert figures["per_class_f1"] == pytest.approx({"W": 2 / 3, "NREM": 2 / 3, "REM": 2 / 3})
    assert figures["macro_f1"] == pytest.approx(2 / 3)
    # κ: p_o = 4/6; p_e = (2·1 + 3·3 + 1·2)/36 = 13/36
    assert figures["kappa"] == pytest.approx((4 / 6 - 13 / 36) / (1 - 13 / 36))


def test_icc_matches_shrout_fleiss_and_punishes_offsets():
    assert icc(SHROUT_FLEISS) == pytest.approx(0.29, abs=0.005)
    truth = np.array([1.0, 4.0, 9.0, 20.0, 35.0])
    assert icc(np.column_stack([truth, truth])) == pytest.approx(1.0)
    shifted = icc(np.column_stack([truth, truth + 10]))
    assert pearson_r(truth, truth + 10) == pytest.approx(1.0)
    assert shifted < 0.9  # Pearson's r is blind to the offset, the ICC is not
    assert icc(np.ones((4, 2))) is None


def test_severity_classes_and_kappa():
    ahi = np.array([0.0, 4.9, 5.0, 14.9, 15.0, 29.9, 30.0, 80.0])
    assert severity_classes(ahi).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert severity_kappa(ahi, ahi) == pytest.approx(1.0)
    # true classes [0,1,2,3], predicted [0,1,2,2]: p_o = 3/4; p_e = (1·1 + 1·1 + 1·2 + 1·0)/16 = 4/16
    kappa = severity_kappa(np.array([1.0, 10.0, 20.0, 40.0]), np.array([2.0, 6.0, 16.0, 29.0]))
    assert kappa == pytest.approx((3 / 4 - 4 / 16) / (1 - 4 / 16))
    assert severity_kappa(np.array([1.0, 2.0]), np.array([3.0, 4.0])) is None


def test_ahi_task_reports_r_icc_and_severity_kappa():
    figures = get_task("ahi").metrics(np.array([1.0, 10.0, 20.0, 40.0, np.nan]), np.array([2.0, 6.0, 16.0, 29.0, 5.0]))
    assert figures["n"] == 4
    assert figures["mae"] == pytest.approx((1 + 4 + 4 + 11) / 4)
    assert set(figures) >= {"pearson_r", "icc", "severity_kappa", "severity_confusion"}
    assert figures["severity_confusion"][3] == [0, 0, 1, 0]


def test_c_index_of_hand_made_examples():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 0, 1])
    # comparable pairs (shorter time has the event): (0,1) (0,2) (0,3) (1,2) (1,3); (2,3) is not (2 censored)
    assert concordance_index(time, event, np.array([4.0, 3.0, 2.0, 1.0])) == pytest.approx(1.0)
    assert concordance_index(time, event, np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.0)
    # risks [3, 3, 1, 2]: (0,1) tie 0.5, (0,2) ✓, (0,3) ✓, (1,2) ✓, (1,3) ✓ → 4.5/5
    assert concordance_index(time, event, np.array([3.0, 3.0, 1.0, 2.0])) == pytest.approx(0.9)
    assert concordance_index(time, np.zeros(4), np.arange(4.0)) is None


def test_cox_partial_likelihood_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    log_risk = torch.randn(7, generator=generator, dtype=torch.float64, requires_grad=True)
    time = torch.tensor([5.0, 3.0, 3.0, 8.0, 1.0, 6.0, 2.0], dtype=torch.float64)
    event = torch.tensor([1, 0, 1, 1, 1, 0, 0])
    expected, events = 0.0, 0
    for i in range(7):
        if event[i]:
            denominator = sum(math.exp(log_risk[j].item()) for j in range(7) if time[j] >= time[i])
            expected -= log_risk[i].item() - math.log(denominator)
            events += 1
    loss = cox_partial_likelihood(log_risk, time, event)
    assert loss.item() == pytest.approx(expected / events)
    loss.backward()
    assert torch.isfinite(log_risk.grad).all() and log_risk.grad.abs().sum() > 0
    no_event = cox_partial_likelihood(log_risk, time, torch.zeros(7))
    assert no_event.item() == 0.0 and no_event.requires_grad


def test_cox_loss_prefers_the_right_order():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.ones(4)
    right = cox_partial_likelihood(torch.tensor([3.0, 2.0, 1.0, 0.0]), time, event)
    wrong = cox_partial_likelihood(torch.tensor([0.0, 1.0, 2.0, 3.0]), time, event)
    assert right < wrong


def test_losses_ignore_unknown_targets():
    task = TASKS["staging"]
    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[0, -1, 4], [-1, -1, 2]])
    loss = task.loss(logits, target)
    known = target.reshape(-1) != -1
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 5)[known], target.reshape(-1)[known])
    assert loss.item() == pytest.approx(expected.item())
    age = TASKS["age"]
    assert age.loss(torch.tensor([50.0, 10.0]), torch.tensor([48.0, float("nan")])).item() == pytest.approx(4.0)
    survival = get_task("survival:death,time")
    value = survival.loss(torch.tensor([0.5, -0.5, 0.0]), torch.tensor([[1.0, 2.0], [0.0, 5.0], [np.nan, 1.0]]))
    assert torch.isfinite(value)


def test_night_targets_read_columns_and_name_missing_ones():
    outcomes = {"ahi": np.array([3.0, 40.0]), "death": np.array([0.0, 1.0]), "time": np.array([9.0, 2.0])}
    age, sex = np.array([40.0, 70.0]), np.array([0.0, 1.0])
    assert night_targets(get_task("sex"), age=age, sex=sex, outcomes=outcomes).tolist() == [0.0, 1.0]
    assert night_targets(get_task("survival:death,time"), age=age, sex=sex, outcomes=outcomes).tolist() == [
        [0.0, 9.0],
        [1.0, 2.0],
    ]
    with pytest.raises(ValueError, match="no outcome column 'stroke'; found ahi, death, time"):
        night_targets(get_task("outcome:stroke"), age=age, sex=sex, outcomes=outcomes)


def test_binary_and_survival_metrics():
    figures = get_task("sex").metrics(np.array([0, 0, 1, 1]), np.array([-2.0, 0.1, 0.0, 3.0]))
    assert figures["auroc"] == pytest.approx(0.75)
    assert "auprc" in figures
    survival = get_task("survival:death,time").metrics(
        np.array([[1, 1.0], [1, 2.0], [0, 3.0], [1, 4.0]]), np.array([4.0, 3.0, 2.0, 1.0])
    )
    assert survival["c_index"] == pytest.approx(1.0) and survival["events"] == 3


def test_event_tasks_read_the_event_bits_of_each_epoch():
    events = np.array([[0, 1, 2, 3], [4, 8, 12, -1]])  # apnoea=1 hypopnoea=2 desaturation=4 arousal=8, -1 unknown
    respiratory = get_task("events")
    assert (respiratory.level, respiratory.kind, respiratory.event_bits) == ("epoch", "binary", 3)
    assert respiratory.store_columns == ("events",) and respiratory.outcome_columns == ()
    target = respiratory.event_targets(events)
    assert target[0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert target[1, :3].tolist() == [0.0, 0.0, 0.0] and np.isnan(target[1, 3])
    assert get_task("arousal").event_targets(events)[1, :3].tolist() == [0.0, 1.0, 1.0]
    desaturation = get_task("events:desaturation, arousal")
    assert desaturation.name == "events:desaturation,arousal" and desaturation.event_bits == 12
    assert get_task("staging").store_columns == ()
    with pytest.raises(ValueError, match="expected kinds among apnea, hypopnea, desaturation, arousal, found snore"):
        get_task("events:snore")
    with pytest.raises(ValueError, match="an event task reads the column 'events'"):
        Task("bad", "night", "binary", ("events",), event_bits=1)


def test_event_task_loss_and_metrics_skip_epochs_without_labels():
    task = get_task("events")
    logits = torch.tensor([[[2.0], [-1.0], [0.5]], [[0.0], [3.0], [-2.0]]])  # (B=2, E=3, 1)
    target = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 0.0]])
    known = ~torch.isnan(target.reshape(-1))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.reshape(-1)[known], target.reshape(-1)[known]
    )
    assert task.loss(logits, target).item() == pytest.approx(expected.item())
    figures = task.metrics(np.array([1.0, 0.0, 0.0, 1.0, 0.0]), np.array([2.0, -1.0, 0.0, 3.0, -2.0]))
    assert figures["auroc"] == pytest.approx(1.0)
