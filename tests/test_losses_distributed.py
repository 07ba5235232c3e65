"""Cross-worker negatives for real: two gloo processes equal one process on the whole batch.

Both DASH formulas with global negatives, and the authors' per-worker (local) negatives,
which must equal each worker's batch scored alone.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.train_loop import make_gather
from s2v_core.losses import DashConfig, PaperDashConfig, dash_infonce
from s2v_core.modalities import MODALITY_KEYS, get_modality
from s2v_core.model import SleepEncoder, model_config
from tests.gloo_workers import finish_worker

WORLD_SIZE = 2
ROWS = 8  # global batch; 4 windows per worker
EPOCHS = 2
KEYS = ("eeg", "spo2", "airflow")
#: (name, DASH config, negatives) of each setting a worker runs.
SETTINGS = (
    ("project", DashConfig(), "global"),
    ("paper", PaperDashConfig(), "global"),
    ("paper-local", PaperDashConfig(), "local"),
)


def make_batch() -> dict[str, torch.Tensor]:
    """The same global batch in every process: ragged presence, shared nights, metadata gaps."""
    generator = torch.Generator().manual_seed(11)
    batch = {k: torch.randn(ROWS, EPOCHS, get_modality(k).samples_per_epoch, generator=generator) for k in KEYS}
    present = torch.zeros(ROWS, len(MODALITY_KEYS), dtype=torch.bool)
    for k in KEYS:
        present[:, MODALITY_KEYS.index(k)] = torch.rand(ROWS, generator=generator) < 0.8
    present[0, MODALITY_KEYS.index("eeg")] = present[0, MODALITY_KEYS.index("spo2")] = True
    age = 20 + 60 * torch.rand(ROWS, generator=generator)
    age[3] = float("nan")
    batch.update(
        present=present,
        age=age,
        sex=torch.tensor([0, 1, 0, float("nan"), 1, 1, 0, 0]),
        # Night 3 spans both workers: its windows must not be negatives across the boundary either.
        night_id=torch.tensor([1, 2, 3, 3, 3, 5, 6, 7]),
        site_id=torch.tensor([10, 10, 20, 20, 20, 30, 10, 30]),
        history=torch.tensor([[1.0], [0.0], [1.0], [1.0], [1.0], [float("nan")], [0.0], [1.0]]),
    )
    return batch


def make_model() -> SleepEncoder:
    torch.manual_seed(0)
    return SleepEncoder(model_config("tiny", modality_dropout=0.0), KEYS).train()


def loss_and_gradients(batch, model, *, rank=0, world_size=1, gather=None, config=DashConfig(), negatives="global"):
    inputs = {k: batch[k].clone().requires_grad_() for k in KEYS}
    out = model.encode({**batch, **inputs})
    result = dash_infonce(
        out.per_modality,
        out.present,
        batch,
        logit_scale=model.logit_scale,
        rank=rank,
        world_size=world_size,
        gather=gather,
        config=config,
        negatives=negatives,
    )
    result.loss.backward()
    params = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return result, {k: v.grad for k, v in inputs.items()}, params


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        per_rank = ROWS // WORLD_SIZE
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        local = {k: v[part] for k, v in make_batch().items()}
        saved = {}
        for name, config, negatives in SETTINGS:
            result, input_grads, params = loss_and_gradients(
                local,
                make_model(),
                rank=rank,
                world_size=WORLD_SIZE,
                gather=make_gather(WORLD_SIZE),
                config=config,
                negatives=negatives,
            )
            # What DDP/DeepSpeed do with parameter gradients: average them over workers.
            for grad in params.values():
                dist.all_reduce(grad)
                grad /= WORLD_SIZE
            saved[name] = {
                "loss": result.loss.detach(),
                "stats": result.to_floats(),
                "inputs": input_grads,
                "params": params,
            }
        torch.save(saved, f"{out_dir}/rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_worker()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def single_process(batch, **options):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return loss_and_gradients(batch, make_model(), **options)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
@pytest.mark.timeout(300)  # generous: shared CI runners; unloaded it takes ~10 s
@pytest.mark.parametrize("name", ["project", "paper"])
def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(two_ranks, name):
    config = dict((n, c) for n, c, _ in SETTINGS)[name]
    ranks = [r[name] for r in two_ranks]
    single, input_grads, params = single_process(make_batch(), config=config)
    single_stats = single.to_floats()

    mean_loss = sum(r["loss"] for r in ranks) / WORLD_SIZE
    assert math.isfinite(single.loss.item()) and single.loss.item() > 0
    assert torch.allclose(mean_loss, single.loss, rtol=1e-5, atol=1e-6)
    for key in KEYS:
        # gather-with-gradient sums every worker's loss gradient into the local inputs,
        # so a worker's input gradient is world_size times that of the averaged loss.
        spread = torch.cat([r["inputs"][key] for r in ranks]) / WORLD_SIZE
        assert torch.allclose(spread, input_grads[key], rtol=1e-4, atol=1e-7), key
    for param, grad in params.items():
        for r in ranks:
            assert torch.allclose(r["params"][param], grad, rtol=1e-4, atol=1e-6), param
    assert all(r["stats"]["global_batch"] == ROWS for r in ranks)
    assert sum(r["stats"]["anchors"] for r in ranks) == single_stats["anchors"]
    assert ranks[0]["stats"]["pairs"] == single_stats["pairs"] == 3


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_local_negatives_equal_each_worker_scored_alone(two_ranks):
    ranks = [r["paper-local"] for r in two_ranks]
    per_rank = ROWS // WORLD_SIZE
    halves = []
    for rank in range(WORLD_SIZE):
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        halves.append(single_process({k: v[part] for k, v in make_batch().items()}, config=PaperDashConfig()))
    for rank, (alone, input_grads, _) in enumerate(halves):
        assert torch.allclose(ranks[rank]["loss"], alone.loss, rtol=1e-5, atol=1e-6)
        assert ranks[rank]["stats"]["global_batch"] == per_rank
        for key in KEYS:  # no gather: a worker's inputs get only its own loss's gradient
            assert torch.allclose(ranks[rank]["inputs"][key], input_grads[key], rtol=1e-4, atol=1e-7), key
    for param in halves[0][2]:
        mean = (halves[0][2][param] + halves[1][2][param]) / WORLD_SIZE
        assert torch.allclose(ranks[0]["params"][param], mean, rtol=1e-4, atol=1e-6), param
