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
    """A :class:`SleepEncoder` with a linear per-epoch stage head on its fused hidden states.

    The same features a probe reads from a pretrained encoder (``s2v embed
    --features hidden``), so the comparison differs only in how the encoder
    was trained.
    """

    def __init__(self, config: ModelConfig, modalities: Sequence[str]) -> None:
        super().__init__()
        self.encoder = SleepEncoder(config, modalities)
        self.classifier = nn.Linear(config.width, N_STAGES)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch of :func:`s2v_core.model.batch_to_tensors` -> ``(B, E, 5)`` stage logits."""
        return self.classifier(self.encoder.encode(batch).fused_hidden)


def scratch_staging_probe(
    signals: dict[str, np.ndarray],
    stages: np.ndarray,
    *,
    config: ModelConfig,
    modalities: Sequence[str],
    seed: int = 0,
    passes: float = 20.0,
    min_steps: int = 100,
    max_steps: int = 3000,
    batch_windows: int = 16,
    learning_rate: float = 1e-3,
    patience: int = 5,
) -> StagingProbe:
    """A probe that trains :class:`SupervisedStager` from scratch on the training rows.

    The budget grows with the labelled data: ``passes`` passes over the
    training windows (clipped to ``[min_steps, max_steps]`` AdamW steps of
    ``batch_windows`` windows), so a model given 100 % of the labels is not
    held to the budget of one given 1 %. With ``val_rows`` the model is
    scored on them (macro-F1) ``20`` times over the budget and the best
    weights are kept, stopping after ``patience`` scores without improvement;
    without them it trains the whole budget.

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
    """
    from s2v_core.evaluation.metrics import staging_metrics
    from s2v_core.model import batch_to_tensors

    keys = [*modalities, "present"]

    def predict(model: SupervisedStager, rows: np.ndarray) -> np.ndarray:
        model.eval()
        predictions = []
        with torch.inference_mode():
            for start in range(0, len(rows), 64):
                chunk = rows[start : start + 64]
                predictions.append(model(batch_to_tensors({k: signals[k][chunk] for k in keys})).argmax(-1).numpy())
        model.train()
        return np.concatenate(predictions).astype(np.int64) if predictions else np.zeros((0, stages.shape[1]), int)

    def fit_predict(train_rows: np.ndarray, test_rows: np.ndarray, val_rows: np.ndarray | None = None) -> np.ndarray:
        with single_thread_torch():
            torch.manual_seed(seed)
            generator = np.random.default_rng(seed)
            model = SupervisedStager(config, modalities)
            optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate)
            loss_fn = nn.CrossEntropyLoss(ignore_index=UNKNOWN_STAGE)
            labels = torch.from_numpy(stages.astype(np.int64))
            steps = int(np.clip(passes * len(train_rows) / batch_windows, min_steps, max_steps))
            scored = val_rows is not None and len(val_rows) > 0 and (stages[val_rows] != UNKNOWN_STAGE).any()
            every = max(1, steps // 20)
            best, best_state, stale = -np.inf, None, 0
            model.train()
            if (stages[train_rows] != UNKNOWN_STAGE).any():
                for step in range(1, steps + 1):
                    pick = generator.choice(train_rows, size=min(batch_windows, len(train_rows)), replace=False)
                    batch = batch_to_tensors({k: signals[k][pick] for k in keys})
                    loss = loss_fn(model(batch).reshape(-1, N_STAGES), labels[pick].reshape(-1))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    if scored and (step % every == 0 or step == steps):
                        score = staging_metrics(stages[val_rows], predict(model, val_rows))["macro_f1"]
                        if score > best:
                            best, stale = score, 0
                            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        else:
                            stale += 1
                            if stale >= patience:
                                break
            if best_state is not None:
                model.load_state_dict(best_state)
            return predict(model, test_rows)

    return fit_predict
