"""The supervised-from-scratch peer of the label-efficiency curve.

An encoder of the same configuration as the pretrained one (same width,
depth, tokenizers, modalities), randomly initialised and trained end to end
with a per-epoch linear stage classifier on exactly the labelled windows the
probe sees. The gap between this model and the probe over frozen pretrained
embeddings at 1 % / 10 % / 100 % of the labels is the label-efficiency claim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from s2v_core.evaluation.metrics import N_STAGES
from s2v_core.evaluation.probes import StagingProbe, single_thread_torch
from s2v_core.model import ModelConfig, SleepEncoder
from s2v_core.store import UNKNOWN_STAGE


class SupervisedStager(nn.Module):
    """A :class:`SleepEncoder` with a linear per-epoch stage head on its fused embeddings."""

    def __init__(self, config: ModelConfig, modalities: Sequence[str]) -> None:
        super().__init__()
        self.encoder = SleepEncoder(config, modalities)
        self.classifier = nn.Linear(config.projection_dim, N_STAGES)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch of :func:`s2v_core.model.batch_to_tensors` -> ``(B, E, 5)`` stage logits."""
        return self.classifier(self.encoder.encode(batch).fused)


def scratch_staging_probe(
    signals: dict[str, np.ndarray],
    stages: np.ndarray,
    *,
    config: ModelConfig,
    modalities: Sequence[str],
    seed: int = 0,
    steps: int = 200,
    batch_windows: int = 16,
    learning_rate: float = 1e-3,
) -> StagingProbe:
    """A probe that trains :class:`SupervisedStager` from scratch on the training rows.

    Parameters
    ----------
    signals : dict
        :func:`s2v_core.store.table_to_batch` arrays aligned with the rows of
        the embeddings (one ``float32 (N, E, samples_per_epoch)`` array per
        modality, robust-normalised, and ``present`` ``bool (N, 9)``).
    stages : ndarray, int64 ``(N, E)``
        Stage codes, -1 unknown (ignored by the loss).
    config, modalities
        Architecture and modalities of the pretrained encoder being compared.
    steps, batch_windows, learning_rate
        AdamW steps of ``batch_windows`` windows; kept small for CPU.
    """
    from s2v_core.model import batch_to_tensors

    keys = [*modalities, "present"]

    def fit_predict(train_rows: np.ndarray, test_rows: np.ndarray) -> np.ndarray:
        with single_thread_torch():
            torch.manual_seed(seed)
            generator = np.random.default_rng(seed)
            model = SupervisedStager(config, modalities)
            optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate)
            loss_fn = nn.CrossEntropyLoss(ignore_index=UNKNOWN_STAGE)
            labels = torch.from_numpy(stages.astype(np.int64))
            model.train()
            if (stages[train_rows] != UNKNOWN_STAGE).any():
                for _ in range(steps):
                    pick = generator.choice(train_rows, size=min(batch_windows, len(train_rows)), replace=False)
                    batch = batch_to_tensors({k: signals[k][pick] for k in keys})
                    loss = loss_fn(model(batch).reshape(-1, N_STAGES), labels[pick].reshape(-1))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            model.eval()
            predictions = []
            with torch.inference_mode():
                for start in range(0, len(test_rows), 64):
                    rows = test_rows[start:start + 64]
                    batch = batch_to_tensors({k: signals[k][rows] for k in keys})
                    predictions.append(model(batch).argmax(dim=-1).numpy())
            return np.concatenate(predictions).astype(np.int64)

    return fit_predict
