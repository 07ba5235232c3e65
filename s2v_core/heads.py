"""Projection heads: backbone hidden states → the aligned space the loss compares.

``linear`` (:class:`LinearHead`)
    One ``Linear(d → P)`` (format-1 encoders and the project preset).
``simclr`` (:class:`SimCLRHead`)
    The authors' head: ``Linear(d→d) → BN → ReLU → Linear(d→P) → BN`` (no
    biases: each BatchNorm brings its own shift).

Both take hidden states grouped by modality, ``(M, rows, d)``, and a
``valid`` mask ``(M, rows)`` that is false for rows of absent modalities;
the caller L2-normalises the output.

BatchNorm here is :class:`MaskedBatchNorm`: statistics per modality group
(the authors pass each modality through the head on its own, so each
modality's projections are centred on their own mean), over valid rows only
(a zero row standing in for an absent modality must not shift the mean).
Under data parallelism the statistics are per rank unless a *reducer* is set
(:meth:`MaskedBatchNorm.set_reducer`): a function that sums a tensor over
ranks with gradient (``torch.distributed.nn.functional.all_reduce``). With
it, every rank normalises with the statistics of the global batch — equal to
one process on the concatenated batch — at the cost of one all-reduce of
``2 * M * features + M`` floats per BatchNorm per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reducer = Callable[[Tensor], Tensor]


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the valid rows of each group, with an optional cross-rank reducer.

    Input ``(G, R, C)`` and ``valid`` ``(G, R)`` bool; output ``(G, R, C)`` float32.
    In training, group ``g`` is normalised with the mean and (biased) variance of
    its valid rows, and the running statistics take one momentum step per group
    that has any valid row (as if each group were a separate BatchNorm call,
    which is what the authors' head does per modality); in eval mode the
    running statistics are used. A group with no valid row leaves them unchanged.
    """

    def __init__(self, features: int, *, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))
        self.reducer: Reducer | None = None

    def set_reducer(self, reducer: Reducer | None) -> None:
        """Sum statistics over ranks with ``reducer`` (differentiable all-reduce), or ``None`` for per-rank."""
        self.reducer = reducer

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x.float()
        if not self.training:
            return F.batch_norm(
                x.flatten(0, 1),
                self.running_mean.float(),
                self.running_var.float(),
                self.weight.float(),
                self.bias.float(),
                False,
                0.0,
                self.eps,
            ).view_as(x)
        groups, features = x.shape[0], x.shape[2]
        weight = valid.to(x.dtype)[..., None]  # (G, R, 1)
        # Shifted sums (shift = the running mean, equal on every rank) keep E[x²] - E[x]²
        # accurate when the mean is large against the spread.
        shift = self.running_mean.detach().to(x.dtype)
        centred = x - shift
        packed = torch.cat([(centred * weight).sum(1), (centred.square() * weight).sum(1), weight.sum(1)], dim=1)
        if self.reducer is not None:
            packed = self.reducer(packed)
        sums, squares, count = packed.split([features, features, 1], dim=1)
        n = count.clamp(min=1.0)
        offset = sums / n  # (G, C): mean - shift
        var = (squares / n - offset.square()).clamp(min=0.0)
        mean = offset + shift
        with torch.no_grad():
            unbiased = var * count / (count - 1.0).clamp(min=1.0)
            for g in range(groups):  # sequential momentum steps, one per group (no host sync)
                step = self.momentum * (count[g] > 0).to(x.dtype)
                self.running_mean.copy_(self.running_mean + step * (mean[g] - self.running_mean))
                self.running_var.copy_(self.running_var + step * (unbiased[g] - self.running_var))
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean[:, None, :]) * scale[:, None, :] + self.bias


class LinearHead(nn.Linear):
    """``Linear(d → P)``; ignores ``valid`` (kept an ``nn.Linear`` so weights stay ``head.weight``/``head.bias``)."""

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:  # noqa: D102
        return super().forward(x)


class SimCLRHead(nn.Module):
    """``Linear(d→d) → MaskedBatchNorm → ReLU → Linear(d→P) → MaskedBatchNorm`` (output not normalised)."""

    def __init__(self, width: int, projection_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.bn1 = MaskedBatchNorm(width)
        self.fc2 = nn.Linear(width, projection_dim, bias=False)
        self.bn2 = MaskedBatchNorm(projection_dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:  # noqa: D102
        return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x), valid))), valid)


def build_head(kind: str, width: int, projection_dim: int) -> nn.Module:
    """The head ``kind`` (``"linear"`` or ``"simclr"``)."""
    if kind == "linear":
        return LinearHead(width, projection_dim)
    if kind == "simclr":
        return SimCLRHead(width, projection_dim)
    raise ValueError(f"head: expected 'linear' or 'simclr', found {kind!r}")
