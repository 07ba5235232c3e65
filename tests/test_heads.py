"""Heads: masked BatchNorm statistics, the SimCLR head, and its statistics synchronised over 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from s2v_core.heads import LinearHead, MaskedBatchNorm, SimCLRHead, build_head
from tests.gloo_workers import run_in_group


def test_statistics_ignore_invalid_rows_and_each_group_is_a_batchnorm_call():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 4) * 3 + 1
    valid = torch.rand(2, 12) < 0.6
    valid[:, 0] = valid[:, 1] = True
    masked, reference = MaskedBatchNorm(4).train(), nn.BatchNorm1d(4).train()
    with torch.no_grad():
        masked.weight.uniform_(0.5, 2)
        masked.bias.normal_()
        reference.load_state_dict(masked.state_dict(), strict=False)
    out = masked(x, valid)
    for g in range(2):  # the authors call the head once per modality
        expected = reference(x[g][valid[g]])
        assert torch.allclose(out[g][valid[g]], expected, atol=1e-5)
    assert torch.allclose(masked.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(masked.running_var, reference.running_var, atol=1e-5)
    masked.eval(), reference.eval()
    assert torch.allclose(masked(x, valid)[0], reference(x[0]), atol=1e-5)


def test_a_group_without_valid_rows_changes_nothing_and_stays_finite():
    norm = MaskedBatchNorm(3).train()
    x = torch.randn(2, 5, 3)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    out = norm(x, valid)
    assert torch.isfinite(out).all()
    assert torch.equal(norm.running_mean, torch.zeros(3)) and torch.equal(norm.running_var, torch.ones(3))


def test_simclr_head_shape_and_gradient_and_linear_head_keys():
    head = SimCLRHead(8, 5).train()
    x = torch.randn(2, 6, 8, requires_grad=True)
    out = head(x, torch.ones(2, 6, dtype=torch.bool))
    assert out.shape == (2, 6, 5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.fc1.bias is None and head.fc2.bias is None  # each BatchNorm brings the shift
    assert set(build_head("linear", 8, 5).state_dict()) == {"weight", "bias"}
    assert isinstance(build_head("linear", 8, 5), LinearHead)
    with pytest.raises(ValueError, match="simclr"):
        build_head("mlp", 8, 5)


# -- synchronised statistics on two gloo ranks ------------------------------------------------------

WORLD_SIZE, ROWS = 2, 10  # rows per rank


def make_case():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, WORLD_SIZE * ROWS, 6, generator=generator) * 2 + 0.5
    valid = torch.rand(2, WORLD_SIZE * ROWS, generator=generator) < 0.7
    target = torch.randn(2, WORLD_SIZE * ROWS, 3, generator=generator)
    return x, valid, target


def head_step(x, valid, target, *, world_size=1, reducer=None):
    torch.manual_seed(0)
    head = SimCLRHead(6, 3).train()
    for norm in (head.bn1, head.bn2):
        norm.set_reducer(reducer)
    out = head(x, valid)
    loss = world_size * (out * target * valid[..., None]).sum() / (WORLD_SIZE * ROWS)
    loss.backward()
    return out.detach(), {n: p.grad for n, p in head.named_parameters()}, head.bn2.running_var.clone()


def worker(rank: int, init_file: str, out_dir: str) -> None:
    def body():
        from pipelines.train_loop import all_reduce_with_grad as all_reduce

        part = slice(rank * ROWS, (rank + 1) * ROWS)
        x, valid, target = (t[:, part] for t in make_case())
        out, grads, running = head_step(x, valid, target, world_size=WORLD_SIZE, reducer=all_reduce)
        for grad in grads.values():  # what DDP/DeepSpeed do
            dist.all_reduce(grad)
            grad /= WORLD_SIZE
        torch.save({"out": out, "grads": grads, "running": running}, f"{out_dir}/rank{rank}.pt")

    run_in_group(rank, WORLD_SIZE, init_file, body)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_reduced_statistics_on_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    out, grads, running = head_step(*make_case())
    assert torch.allclose(torch.cat([r["out"] for r in ranks], dim=1), out, atol=1e-5)
    for name, grad in grads.items():
        for r in ranks:
            assert torch.allclose(r["grads"][name], grad, rtol=1e-4, atol=1e-6), name
    assert all(torch.allclose(r["running"], running, atol=1e-6) for r in ranks)
    # Without the reducer each rank would normalise with its own statistics: different outputs.
    alone, _, _ = head_step(*(t[:, :ROWS] for t in make_case()))
    assert not torch.allclose(alone, out[:, :ROWS], atol=1e-3)
