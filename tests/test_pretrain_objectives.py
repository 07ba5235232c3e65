"""s2v pretrain with the paper's objective: 120-epoch windows, random pairs, EMA, held-out validation.

One short 2-worker run of ``tiny`` under ``--objective paper`` on a toy store
of 1-h (120-epoch) windows: the rotary encoder trains on one modality pair per
step, keeps an EMA whose weights are the saved encoder, validates on the val
subjects, and a worker failure resumes from the checkpoint, EMA state included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.checkpoints import read_state
from pipelines.pretrain import pretrain
from pipelines.train_config import load_pretrain_config
from s2v_core.model import load_encoder
from s2v_core.run_layout import EMA_FILE, ONLINE_ENCODER_DIR, TRAINING_RECORD_FILE
from s2v_core.splits import read_split_file
from s2v_core.toystore import write_toy_store

pytestmark = pytest.mark.integration

MODALITIES = ("eeg", "ecg", "hr", "spo2")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # Per site: 2 train nights, 1 val night (2 windows of 120 epochs each).
    return write_toy_store(
        tmp_path_factory.mktemp("store"),
        sites=2,
        recordings_per_site=3,
        windows_per_recording=2,
        epochs_per_window=120,
        modalities=MODALITIES,
        seed=3,
        val_per_site=1,
    )


def test_paper_objective_trains_on_long_windows_with_ema_and_resumes(ray_local, store, tmp_path):
    # The last worker raises once before step 4: the group restarts from the step-2 checkpoint (EMA included).
    config = load_pretrain_config(
        None,
        data=str(store),
        output=str(tmp_path / "run"),
        objective="paper",
        model="tiny",
        workers=2,
        steps=4,
        global_batch=4,
        checkpoint_every=2,
        validate_every=2,
        lr=1e-3,
        fail_at_step=4,
        keep_checkpoints=5,
    )
    assert config.ema and config.loss_objective.pairing == "random_pair" and config.betas == (0.9, 0.95)
    first = pretrain(config)
    assert first.steps == 4 and (tmp_path / "run" / ".failed_at_step_4").is_file()
    checkpoint = Path(first.checkpoint)
    # EMA: the saved encoder holds the averaged weights; the optimiser's own sit beside them.
    assert (checkpoint / EMA_FILE).is_file() and (checkpoint / ONLINE_ENCODER_DIR / "encoder.pt").is_file()
    averaged, online = load_encoder(checkpoint / "encoder"), load_encoder(checkpoint / ONLINE_ENCODER_DIR)
    assert averaged.config.position == "rotary" and averaged.config.head == "simclr"
    differ = [
        k
        for k, v in averaged.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, online.state_dict()[k])
    ]
    assert differ, "the EMA weights should lag the optimiser's"
    # Held-out validation on the val subjects ran and was recorded with the final metrics.
    metrics = read_state(first.checkpoint)["metrics"]
    assert metrics["val/windows"] == 4 and "val/loss_ratio_mean" in metrics
    # The encoder says which subjects trained it; the store knows the run used its assignment.
    record = json.loads((Path(first.encoder_dir) / TRAINING_RECORD_FILE).read_text())
    assert record["splits"] == ["train"] and record["store_id"] == read_split_file(str(store))["store_id"]
    assert str(tmp_path / "run") in read_split_file(str(store))["used_by"]
    # A rotary encoder encodes a sequence longer than it trained on: a whole 2-h night.
    encoder = load_encoder(first.encoder_dir)
    night = {"eeg": torch.randn(1, 240, 3840), "present": torch.zeros(1, 9, dtype=torch.bool)}
    night["present"][0, 0] = True
    with torch.no_grad():
        out = encoder.encode(night, modalities=["eeg"])
    assert out.fused_hidden.shape == (1, 240, encoder.config.width)
