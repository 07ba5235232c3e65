"""Exponential moving average of a module's weights (the authors' EMA "teacher").

After optimiser step ``t`` of a run of ``T`` steps::

    m_t = end - (end - start) * (1 + cos(π t / T)) / 2      (m_t = end for t >= T)
    shadow = m_t * shadow + (1 - m_t) * weight

for every parameter (the authors' rule, DINOv2's cosine schedule from 0.996
to 1.0); buffers (BatchNorm running statistics) are copied as they are, so
the EMA weights are used with the statistics the model last saw. The shadow
is kept in float32 whatever the module's dtype (a bf16 shadow could not
absorb updates of ``1 - m`` ≈ 4e-3 of a weight). Updates are foreach tensor
ops with a Python-float momentum: no host-device synchronisation.

Under DeepSpeed ZeRO-3 a rank holds only its partition of each parameter;
update the EMA inside ``deepspeed.zero.GatheredParameters`` or from the
partitions, which is the training loop's business, not this class's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """EMA momentum after optimiser step ``step`` of ``total_steps`` (module docstring)."""
    if total_steps <= 0 or step >= total_steps:
        return end
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


class EMA:
    """Float32 shadow copies of a module's parameters and buffers, updated with a cosine momentum.

    Parameters
    ----------
    module : nn.Module
        The trained module; the shadow starts as a copy of its weights.
    total_steps : int
        Optimiser steps of the run (the schedule reaches ``momentum_end`` there).
    momentum_start, momentum_end : float
        Momentum at step 0 and at ``total_steps``.
    """

    def __init__(
        self, module: nn.Module, *, total_steps: int, momentum_start: float = 0.996, momentum_end: float = 1.0
    ) -> None:
        if not 0.0 <= momentum_start <= momentum_end <= 1.0:
            raise ValueError(
                f"EMA: expected 0 <= momentum_start <= momentum_end <= 1, found {momentum_start!r}, {momentum_end!r}"
            )
        if total_steps < 1:
            raise ValueError(f"EMA: total_steps must be >= 1, found {total_steps!r}")
        self.total_steps, self.momentum_start, self.momentum_end = total_steps, momentum_start, momentum_end
        self.step = 0
        with torch.no_grad():
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}
            self.buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    def momentum(self, step: int) -> float:
        """The momentum :meth:`update` uses after optimiser step ``step``."""
        return cosine_momentum(step, self.total_steps, self.momentum_start, self.momentum_end)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> float:
        """Fold ``module``'s current weights into the shadow after optimiser step ``step``; returns the momentum."""
        m = self.momentum(step)
        names = list(self.shadow)
        params = dict(module.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(
                f"EMA.update: the module lacks parameter(s) {', '.join(missing[:3])}; "
                "update with the module the EMA was built from"
            )
        shadow = [self.shadow[n] for n in names]
        torch._foreach_mul_(shadow, m)
        torch._foreach_add_(shadow, [params[n].detach().float() for n in names], alpha=1.0 - m)
        for name, buffer in module.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(buffer)
        self.step = step
        return m

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the EMA weights (and buffers) into ``module`` in place, in its dtype."""
        for name, param in module.named_parameters():
            param.copy_(self.shadow[name])
        for name, buffer in module.named_buffers():
            if name in self.buffers:
                buffer.copy_(self.buffers[name])

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """Run ``module`` with the EMA weights inside the block; its own weights come back after."""
        with torch.no_grad():
            saved = {n: t.detach().clone() for n, t in module.state_dict(keep_vars=True).items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, value in module.state_dict(keep_vars=True).items():
                    value.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: shadow weights, buffers, schedule and last step."""
        return {
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
            "step": self.step,
            "total_steps": self.total_steps,
            "momentum_start": self.momentum_start,
            "momentum_end": self.momentum_end,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the same parameter names are required)."""
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA.load_state_dict: parameter names differ (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        device = next(iter(self.shadow.values())).device if self.shadow else None
        self.shadow = {n: t.detach().float().to(device).clone() for n, t in state["shadow"].items()}
        self.buffers = {n: t.detach().to(device).clone() for n, t in state["buffers"].items()}
        self.step, self.total_steps = int(state["step"]), int(state["total_steps"])
        self.momentum_start, self.momentum_end = float(state["momentum_start"]), float(state["momentum_end"])
