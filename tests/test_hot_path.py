"""The training step's hot path (encode + loss + backward) never waits on the device.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` proves it (benchmarks/bench_model.py
runs that check). On CPU, two stand-ins: a torch-function mode that fails on every
operation that synchronises a CUDA stream or makes a shape depend on data
(``.item()``, ``bool(tensor)``, ``nonzero``, boolean-mask indexing, host data turned
into a tensor, …), and ``torch.compile(fullgraph=True)``, which fails on a graph break.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from s2v_core.losses import dash_infonce
from s2v_core.model import SleepEncoder, model_config
from s2v_core.objective import load_objective
from tests.test_model import random_batch

KEYS = ("eeg", "ecg", "hr", "spo2")
SYNCING = {
    Tensor.item,
    Tensor.tolist,
    Tensor.__bool__,
    Tensor.__int__,
    Tensor.__float__,
    Tensor.__index__,
    Tensor.nonzero,
    torch.nonzero,
    Tensor.nonzero_static,
    torch.argwhere,
    torch.masked_select,
    Tensor.masked_select,
    torch.unique,
    Tensor.unique,
    Tensor.index_copy,
    Tensor.index_copy_,
    Tensor.cpu,
    Tensor.numpy,
    torch.repeat_interleave,
}


class ForbidHostSync(TorchFunctionMode):
    """Raise on any torch operation that would make a CUDA step wait on the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            raise AssertionError(f"{getattr(func, '__name__', func)} synchronises with the device")
        if func is Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index):
                raise AssertionError("boolean-mask indexing has a data-dependent shape")
        if func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], Tensor):
            raise AssertionError("a tensor built from host data is a host-to-device copy per call")
        return func(*args, **kwargs)


def make_step(preset: str):
    objective = load_objective(preset)
    torch.manual_seed(0)
    overrides = {**objective.model_overrides(), "modality_dropout": 0.3}
    model = SleepEncoder(model_config("tiny", **overrides), KEYS).train()
    batch = random_batch(6, KEYS, epochs=4)
    batch["present"][0, 1] = batch["present"][2, 3] = False  # ragged presence
    batch.update(
        age=torch.tensor([30.0, 40.0, float("nan"), 60.0, 70.0, 80.0]),
        sex=torch.tensor([0.0, 1.0] * 3),
        site_id=torch.tensor([1, 1, 2, 2, 3, 3]),
        night_id=torch.tensor([1, 1, 2, 3, 4, 5]),
        history=torch.tensor([[1.0], [0.0], [float("nan")], [1.0], [0.0], [1.0]]),
    )
    modalities = objective.objective.step_modalities(KEYS, seed=0, step=1)
    options = {**objective.objective.loss_options(), "epoch_chunk": 2}

    def step(batch):
        out = model.encode(batch, modalities=modalities, mask_rate=objective.objective.mask_rate)
        return dash_infonce(out.per_modality, out.present, batch, logit_scale=out.logit_scale, **options).loss

    return model, batch, step


@pytest.mark.parametrize("preset", ["project", "paper"])
def test_encode_loss_and_backward_use_no_host_synchronising_operation(preset):
    model, batch, step = make_step(preset)
    with ForbidHostSync():
        step(batch).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_guard_catches_what_it_should():
    x = torch.ones(3)
    for bad in (
        lambda: x.sum().item(),
        lambda: bool(x.any()),
        lambda: x[x > 0],
        lambda: torch.tensor([1, 2]),
        lambda: x.nonzero(),
    ):
        with pytest.raises(AssertionError), ForbidHostSync():
            bad()


@pytest.mark.parametrize("preset", ["project", "paper"])
def test_encode_and_loss_compile_without_a_graph_break(preset):
    torch._dynamo.reset()
    model, batch, step = make_step(preset)
    eager = step(batch)  # same RNG draws below: reseed
    model, batch, step = make_step(preset)
    compiled = torch.compile(step, backend="eager", fullgraph=True)  # raises on a graph break
    loss = compiled(batch)
    loss.backward()
    assert torch.isfinite(loss) and torch.allclose(loss, eager, atol=1e-5)
