"""DASH-InfoNCE: weights, reduction to InfoNCE, masking, a loop reference, faked cross-worker gather."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from s2v_core.losses import (
    DashConfig,
    LossOutput,
    PaperDashConfig,
    dash_infonce,
    dash_log_weights,
    dash_weights,
    paper_dash_weights,
)
from s2v_core.modalities import MODALITY_KEYS

KEYS = ("eeg", "ecg", "spo2")


def make_case(
    rows: int = 8,
    *,
    epochs: int = 2,
    dim: int = 6,
    keys=KEYS,
    seed: int = 0,
    same_meta: bool = False,
    all_present: bool = False,
):
    """Random normalised embeddings, a ragged presence mask and metadata with gaps."""
    generator = torch.Generator().manual_seed(seed)
    z = {k: F.normalize(torch.randn(rows, epochs, dim, generator=generator), dim=-1) for k in keys}
    present = torch.zeros(rows, len(MODALITY_KEYS), dtype=torch.bool)
    for k in keys:
        column = MODALITY_KEYS.index(k)
        present[:, column] = True if all_present else torch.rand(rows, generator=generator) < 0.75
        z[k] = z[k] * present[:, column, None, None]  # absent rows are zero, as the encoder makes them
    if same_meta:
        meta = {
            "age": torch.full((rows,), 50.0),
            "sex": torch.zeros(rows),
            "site_id": torch.zeros(rows, dtype=torch.int64),
            "night_id": torch.arange(rows, dtype=torch.int64),
            "history": torch.zeros(rows, 1),
        }
    else:
        age = 20 + 60 * torch.rand(rows, generator=generator)
        age[1] = float("nan")
        sex = torch.randint(0, 2, (rows,), generator=generator).float()
        sex[2] = float("nan")
        history = torch.randint(0, 2, (rows, 2), generator=generator).float()
        history[3, 0] = float("nan")
        meta = {
            "age": age,
            "sex": sex,
            "site_id": torch.randint(0, 3, (rows,), generator=generator) * 1000003,
            "night_id": torch.tensor([i // 2 if i < 4 else i for i in range(rows)]),
            "history": history,
        }
    return z, present, meta


def raw_weight(meta, i, j, config: DashConfig) -> float:
    """w_ij written out factor by factor, straight from the module docstring."""
    w = config.same_site_factor if meta["site_id"][i] == meta["site_id"][j] else config.other_site_factor
    si, sj = float(meta["sex"][i]), float(meta["sex"][j])
    if not (math.isnan(si) or math.isnan(sj)):
        w *= config.same_sex_factor if si == sj else config.other_sex_factor
    ai, aj = float(meta["age"][i]), float(meta["age"][j])
    if not (math.isnan(ai) or math.isnan(aj)):
        w *= config.age_factor ** (2 * math.exp(-abs(ai - aj) / config.age_sigma_years) - 1)
    known = agree = 0
    for hi, hj in zip(meta["history"][i].tolist(), meta["history"][j].tolist()):
        if not (math.isnan(hi) or math.isnan(hj)):
            known += 1
            agree += (hi > config.history_threshold) == (hj > config.history_threshold)
    if known:
        w *= config.history_factor ** (2 * agree / known - 1)
    return w if config.enabled else 1.0


def negative_terms(meta, present, i, b, config):
    """Candidates j != i of anchor i for modality b, each with (log w_ij, margin_ij), by either formula."""
    nights = meta["night_id"].tolist()
    rows = len(nights)
    if isinstance(config, PaperDashConfig):  # every window holding b, same night included (tiny weight, margin)
        w, _ = paper_dash_weights(meta, meta, config, candidates=present[:, b])
        return {
            j: (math.log(max(w[i, j].item(), 1e-6)), config.same_night_margin * (nights[j] == nights[i]))
            for j in range(rows)
            if j != i and present[j, b]
        }
    negatives = [j for j in range(rows) if present[j, b] and nights[j] != nights[i]]
    raw = {j: raw_weight(meta, i, j, config) for j in negatives}
    mean = sum(raw.values()) / max(len(raw), 1)
    return {j: (math.log(raw[j] / mean), 0.0) for j in negatives}


def loop_reference(z, present, meta, scale, config=DashConfig()) -> torch.Tensor:
    """The loss anchor by anchor with Python loops: slow, obvious, independent of the vectorised code."""
    keys = [k for k in MODALITY_KEYS if k in z]
    rows, epochs = next(iter(z.values())).shape[:2]
    terms = []
    for a, b in itertools.permutations(keys, 2):
        ca, cb = MODALITY_KEYS.index(a), MODALITY_KEYS.index(b)
        for i in range(rows):
            if not (present[i, ca] and present[i, cb]):
                continue
            negatives = negative_terms(meta, present, i, cb, config)
            for e in range(epochs):
                logits = [scale * (z[a][i, e] @ z[b][i, e])]
                logits += [
                    scale * (z[a][i, e] @ z[b][j, e] - margin) + log_w for j, (log_w, margin) in negatives.items()
                ]
                terms.append(-(logits[0] - torch.logsumexp(torch.stack(logits), 0)))
    return torch.stack(terms).mean()


# -- w_ij -----------------------------------------------------------------------------------------


def test_raw_weights_are_symmetric_and_match_the_formula():
    _, _, meta = make_case(8)
    config = DashConfig()
    raw = dash_weights(meta, meta, config, normalise=False)
    assert torch.allclose(raw, raw.T)
    for i, j in [(0, 5), (1, 6), (2, 7), (3, 4), (5, 5)]:
        assert math.isclose(raw[i, j].item(), raw_weight(meta, i, j, config), rel_tol=1e-5)


def test_normalised_weights_have_mean_one_and_mask_the_same_night():
    _, _, meta = make_case(8)
    w = dash_weights(meta, meta)
    same_night = meta["night_id"][:, None] == meta["night_id"][None, :]
    assert torch.all(w[same_night] == 0)
    means = w.sum(1) / (~same_night).sum(1)
    assert torch.allclose(means, torch.ones(8), atol=1e-5)
    assert not torch.allclose(w[~same_night], torch.ones(1))  # metadata really moves the weights


def test_missing_metadata_is_neutral():
    config = DashConfig()
    meta = {
        "age": torch.tensor([40.0, float("nan"), 40.0]),
        "sex": torch.tensor([1.0, float("nan"), 0.0]),
        "site_id": torch.tensor([1, 2, 2]),
        "night_id": torch.tensor([1, 2, 3]),
        "history": torch.tensor([[1.0], [float("nan")], [0.0]]),
    }
    raw = dash_weights(meta, meta, config, normalise=False)
    # Night 1 knows nothing of night 0 but its site: only the site factor applies.
    assert math.isclose(raw[0, 1].item(), config.other_site_factor, rel_tol=1e-6)
    assert math.isclose(raw[1, 2].item(), config.same_site_factor, rel_tol=1e-6)
    # Without any metadata columns but ids every pair of one site is equal.
    bare = {"site_id": torch.zeros(3, dtype=torch.int64), "night_id": torch.arange(3)}
    assert torch.allclose(dash_weights(bare, bare, config, normalise=False), torch.full((3, 3), 2.0))


def test_weights_grow_as_nights_are_more_alike():
    config = DashConfig()
    meta = {
        "age": torch.tensor([50.0, 51.0, 80.0, 50.0, 50.0]),
        "sex": torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]),
        "site_id": torch.tensor([7, 7, 7, 7, 8]),
        "night_id": torch.arange(5),
        "history": torch.ones(5, 1),
    }
    raw = dash_weights(meta, meta, config, normalise=False)[0]  # night 0 against each night
    assert raw[0] > raw[1] > raw[2]  # age 50 vs 50, 51, 80
    assert math.isclose(raw[0] / raw[3], config.same_sex_factor / config.other_sex_factor, rel_tol=1e-6)
    assert math.isclose(raw[0] / raw[4], config.same_site_factor / config.other_site_factor, rel_tol=1e-6)
    meta["history"][1] = 0.0
    assert dash_weights(meta, meta, config, normalise=False)[0, 1] < raw[1]  # history disagrees now


def test_disabled_dash_gives_unit_weights():
    _, _, meta = make_case(6)
    assert torch.equal(dash_log_weights(meta, meta, DashConfig(enabled=False)), torch.zeros(6, 6))


def test_config_rejects_non_positive_factors():
    with pytest.raises(ValueError, match="age_sigma_years"):
        DashConfig(age_sigma_years=0)
    with pytest.raises(ValueError, match="other_site_factor"):
        DashConfig(other_site_factor=-1.0)


# -- the loss -------------------------------------------------------------------------------------


def clip_infonce(z, scale):
    """The standard symmetric CLIP InfoNCE of every pair of modalities and epoch position."""
    keys = [k for k in MODALITY_KEYS if k in z]
    rows, epochs = next(iter(z.values())).shape[:2]
    target = torch.arange(rows)
    terms = [
        F.cross_entropy(scale * z[a][:, e] @ z[b][:, e].T, target)
        for a, b in itertools.permutations(keys, 2)
        for e in range(epochs)
    ]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("config", [DashConfig(), DashConfig(enabled=False)], ids=["equal-meta", "disabled"])
def test_equal_weights_reduce_exactly_to_standard_infonce(config):
    z, present, meta = make_case(8, same_meta=config.enabled, all_present=True, seed=4)
    if not config.enabled:
        meta["night_id"] = torch.arange(8)  # every window its own night, as in plain CLIP
    scale = torch.tensor(math.log(1 / 0.1))
    out = dash_infonce(z, present, meta, logit_scale=scale, config=config)
    assert torch.allclose(out.loss, clip_infonce(z, scale.exp()), atol=1e-5)
    assert out.stats["negatives_per_anchor"] == 7 and out.stats["pairs"] == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_loss_equals_the_loop_reference(seed):
    z, present, meta = make_case(10, seed=seed)
    scale = torch.tensor(2.5)
    out = dash_infonce(z, present, meta, logit_scale=scale)
    assert torch.allclose(out.loss, loop_reference(z, present, meta, scale.exp()), atol=1e-5)


def test_the_same_night_is_never_a_negative():
    z, present, meta = make_case(6, all_present=True, same_meta=True, seed=5)
    meta["night_id"] = torch.tensor([0, 0, 1, 2, 3, 4])
    out = dash_infonce(z, present, meta, logit_scale=torch.tensor(2.0))
    assert out.stats["negatives_per_anchor"] == pytest.approx((2 * 4 + 4 * 5) / 6)
    # Two windows of one night: no negatives at all, so nothing to push apart and a zero loss.
    two = {k: v[:2] for k, v in z.items()}
    alone = dash_infonce(two, present[:2], {k: v[:2] for k, v in meta.items()}, logit_scale=torch.tensor(2.0))
    assert alone.loss.item() == 0 and alone.stats["negatives_per_anchor"] == 0
    meta["night_id"] = torch.arange(6)
    apart = dash_infonce(two, present[:2], {k: v[:2] for k, v in meta.items()}, logit_scale=torch.tensor(2.0))
    assert apart.loss.item() > 0


def test_dash_weighting_changes_the_loss_and_reports_its_categories():
    z, present, meta = make_case(10, seed=3)
    scale = torch.tensor(2.5)
    weighted = dash_infonce(z, present, meta, logit_scale=scale)
    plain = dash_infonce(z, present, meta, logit_scale=scale, config=DashConfig(enabled=False))
    assert not torch.allclose(weighted.loss, plain.loss)
    stats = weighted.stats
    assert {
        "negatives_per_anchor",
        "pairs",
        "weight_same_site",
        "weight_other_site",
        "weight_same_sex",
        "weight_other_sex",
        "temperature",
        "anchors",
        "global_batch",
        "loss",
    } <= set(stats)
    assert stats["weight_same_site"] > 1.0 > stats["weight_other_site"]
    assert stats["weight_same_sex"] > stats["weight_other_sex"]
    assert plain.stats["weight_same_site"] == pytest.approx(1.0) == plain.stats["weight_other_sex"]
    assert stats["temperature"] == pytest.approx(math.exp(-2.5))


def test_gradients_reach_embeddings_and_temperature():
    z, present, meta = make_case(8, seed=6)
    leaves = {k: v.clone().requires_grad_() for k, v in z.items()}
    scale = torch.tensor(2.0, requires_grad=True)
    dash_infonce(leaves, present, meta, logit_scale=scale).loss.backward()
    assert scale.grad is not None and scale.grad != 0
    for k, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all()
        present_rows = present[:, MODALITY_KEYS.index(k)]
        assert leaf.grad[present_rows].abs().sum() > 0


def test_a_single_modality_gives_a_zero_loss_that_still_backpropagates():
    z, present, meta = make_case(4, keys=("eeg",), all_present=True)
    leaf = z["eeg"].clone().requires_grad_()
    out = dash_infonce({"eeg": leaf}, present, meta, logit_scale=torch.tensor(1.0))
    out.loss.backward()
    assert out.loss.item() == 0 and out.stats["pairs"] == 0 and torch.all(leaf.grad == 0)


def test_temperature_is_clamped():
    z, present, meta = make_case(4)
    out = dash_infonce(z, present, meta, logit_scale=torch.tensor(10.0), config=DashConfig(max_logit_scale=50.0))
    assert out.stats["temperature"] == pytest.approx(1 / 50.0)


# -- cross-worker negatives with a faked gather ----------------------------------------------------


def run_ranks(world_size: int, work):
    """Run ``work(rank, gather)`` in one thread per rank; ``gather`` is an in-process all_gather.

    Concatenating the ranks' own tensors keeps autograd intact, like
    ``torch.distributed.nn.functional.all_gather``: the gradient of every
    rank's loss reaches every rank's inputs.
    """
    barrier, slots, results, errors = threading.Barrier(world_size), {}, [None] * world_size, []

    def gather_for(rank):
        counter = itertools.count()

        def gather(tensor):
            call = next(counter)
            slots[call, rank] = tensor
            barrier.wait(timeout=30)
            return torch.cat([slots[call, r] for r in range(world_size)])

        return gather

    def target(rank):
        try:
            results[rank] = work(rank, gather_for(rank))
        except BaseException as exc:  # surface it in the test thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("config", [DashConfig(), PaperDashConfig()], ids=["project", "paper"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_faked_gather_equals_the_single_process_loss_and_gradients(world_size, config):
    rows = 12
    z, present, meta = make_case(rows, seed=7)  # ragged presence: ranks hold unequal numbers of anchors
    full = {k: v.clone().requires_grad_() for k, v in z.items()}
    scale_single = torch.tensor(2.2, requires_grad=True)
    single = dash_infonce(full, present, meta, logit_scale=scale_single, config=config)
    single.loss.backward()

    shared = {k: v.clone().requires_grad_() for k, v in z.items()}
    scales = [torch.tensor(2.2, requires_grad=True) for _ in range(world_size)]
    per_rank = rows // world_size

    def work(rank, gather):
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        return dash_infonce(
            {k: v[part] for k, v in shared.items()},
            present[part],
            {k: v[part] for k, v in meta.items()},
            logit_scale=scales[rank],
            rank=rank,
            world_size=world_size,
            gather=gather,
            config=config,
        )

    outs: list[LossOutput] = run_ranks(world_size, work)
    mean_loss = torch.stack([o.loss for o in outs]).mean()
    mean_loss.backward()  # what averaging gradients over workers optimises
    assert torch.allclose(mean_loss, single.loss, atol=1e-6)
    for k in KEYS:
        assert torch.allclose(shared[k].grad, full[k].grad, atol=1e-6)
    # Each replica's temperature got grad(L_r) / world_size: summed, that is the worker average.
    assert torch.allclose(torch.stack([s.grad for s in scales]).sum(), scale_single.grad, atol=1e-6)
    assert all(o.stats["global_batch"] == rows for o in outs)
    assert sum(o.stats["anchors"] for o in outs) == single.stats["anchors"]


def test_world_size_errors_are_explicit():
    z, present, meta = make_case(4)
    with pytest.raises(ValueError, match="gather"):
        dash_infonce(z, present, meta, logit_scale=torch.tensor(1.0), rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        dash_infonce(
            z, present, meta, logit_scale=torch.tensor(1.0), rank=2, world_size=2, gather=lambda t: torch.cat([t, t])
        )
    with pytest.raises(ValueError, match="same batch size"):
        dash_infonce(
            z,
            present,
            meta,
            logit_scale=torch.tensor(1.0),
            rank=0,
            world_size=2,
            gather=lambda t: torch.cat([t, t[:1]]),
        )


# -- the authors' formula, chunking, local negatives, statistics ------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_formula_equals_its_loop_reference(seed):
    z, present, meta = make_case(10, seed=seed)
    scale = torch.tensor(math.log(1 / 0.2))
    out = dash_infonce(z, present, meta, logit_scale=scale, config=PaperDashConfig())
    assert torch.allclose(out.loss, loop_reference(z, present, meta, scale.exp(), PaperDashConfig()), atol=1e-5)
    # Same-night windows stay candidates (with a tiny weight), so there are more of them than in the project's.
    project = dash_infonce(z, present, meta, logit_scale=scale)
    assert out.stats["negatives_per_anchor"] > project.stats["negatives_per_anchor"]


@pytest.mark.parametrize("config", [DashConfig(), PaperDashConfig()], ids=["project", "paper"])
def test_chunked_loss_equals_the_unchunked_loss_and_gradient(config):
    z, present, meta = make_case(8, epochs=7, seed=9)
    results = []
    for chunk in (None, 3, 1):
        leaves = {k: v.clone().requires_grad_() for k, v in z.items()}
        scale = torch.tensor(2.0, requires_grad=True)
        out = dash_infonce(leaves, present, meta, logit_scale=scale, config=config, epoch_chunk=chunk)
        out.loss.backward()
        results.append((out.loss.detach(), {k: v.grad for k, v in leaves.items()}, scale.grad))
    for loss, grads, scale_grad in results[1:]:
        assert torch.allclose(loss, results[0][0], atol=1e-6)
        assert torch.allclose(scale_grad, results[0][2], atol=1e-6)
        for k in grads:
            assert torch.allclose(grads[k], results[0][1][k], atol=1e-6)


def test_local_negatives_score_each_worker_on_its_own_batch_without_a_collective():
    z, present, meta = make_case(12, seed=2)

    def refuse(tensor):
        raise AssertionError("local negatives must not gather")

    for rank in range(2):
        part = slice(rank * 6, (rank + 1) * 6)
        local = dash_infonce(
            {k: v[part] for k, v in z.items()},
            present[part],
            {k: v[part] for k, v in meta.items()},
            logit_scale=torch.tensor(2.0),
            rank=rank,
            world_size=2,
            gather=refuse,
            negatives="local",
        )
        alone = dash_infonce(
            {k: v[part] for k, v in z.items()},
            present[part],
            {k: v[part] for k, v in meta.items()},
            logit_scale=torch.tensor(2.0),
        )
        assert torch.equal(local.loss, alone.loss) and local.stats["global_batch"] == 6


def test_statistics_are_tensors_read_in_one_transfer():
    z, present, meta = make_case(8, seed=1)
    out = dash_infonce(z, present, meta, logit_scale=torch.tensor(2.0))
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in out.stats.values())
    floats = out.to_floats()
    assert set(floats) == set(out.stats) and all(type(v) is float for v in floats.values())
    assert floats["loss"] == pytest.approx(out.loss.item())
    assert LossOutput(loss=out.loss, stats={}).to_floats() == {}


def test_bad_options_are_errors():
    z, present, meta = make_case(4)
    with pytest.raises(ValueError, match="negatives"):
        dash_infonce(z, present, meta, logit_scale=torch.tensor(1.0), negatives="everyone")
    with pytest.raises(ValueError, match="epoch_chunk"):
        dash_infonce(z, present, meta, logit_scale=torch.tensor(1.0), epoch_chunk=0)
    with pytest.raises(TypeError, match="DashConfig"):
        dash_infonce(z, present, meta, logit_scale=torch.tensor(1.0), config={"enabled": True})


def test_similarities_stay_float32_inside_a_bf16_autocast_region():
    z, present, meta = make_case(8, seed=3)
    plain = dash_infonce(z, present, meta, logit_scale=torch.tensor(2.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dash_infonce(z, present, meta, logit_scale=torch.tensor(2.5))
    assert mixed.loss.dtype == torch.float32 and torch.allclose(mixed.loss, plain.loss, atol=1e-6)
