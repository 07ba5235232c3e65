"""Training-step throughput of the encoder + DASH-InfoNCE per size and objective preset, on CPU or one GPU.

Run::

    python benchmarks/bench_model.py --device cpu                       # tiny, small; old vs new stems
    python benchmarks/bench_model.py --device cuda --budget-seconds 210 # base, large, small, base@120

Prints one JSON object. For every size (``--sizes``; ``base@120`` = 120-epoch
windows) and objective preset (``--presets``), a full training step — encode
+ loss + backward + gradient clip + fused AdamW — measured eager and, where
chosen and the budget allows, with ``torch.compile`` of encode + loss
(forward and backward through AOTAutograd; the optimiser stays eager):

- ``windows_per_s``, ``step_ms``; ``tflops`` (FLOPs of one step counted by
  ``torch.utils.flop_counter.FlopCounterMode`` over the step time); ``mfu_peak``
  against the device's dense bf16 peak (``peak_tflops``: H100/H200 989, A100
  312; null elsewhere) and ``mfu_matmul`` against a bf16 8192³ matmul measured
  in the same run (fp32 2048³ on CPU);
- ``peak_memory_mb`` (CUDA) and ``saved_activation_mb`` (tensors kept for backward);
- ``dash_share``: the loss alone (forward + backward on the step's embeddings) over the step;
- ``host_syncs_per_step`` (CUDA): synchronising calls counted with
  ``torch.cuda.set_sync_debug_mode("warn")``, and ``sync_error_mode`` "ok" when a
  step also runs under mode "error";
- on CPU, ``old_conv``: the same step with the format-1 ``nn.Conv1d`` stems
  (same backbone) and the new/old throughput ratio;
- ``graph_breaks`` per preset (``torch._dynamo.explain`` of encode + loss).

``long_context``: the loss alone on 120-epoch windows with the ``paper``
preset's batch at an emulated 8-worker global batch, unchunked vs chunked.

Negatives: ``project`` shares them over an emulated 2-worker global batch
(the gather concatenates a stand-in for the other worker: same shapes, other
nights; no network time), ``paper`` keeps them per worker. bf16 autocast on
CUDA (float32 similarities in the loss), float32 on CPU. Imports only torch,
numpy and s2v_core (runs where Ray, DeepSpeed and MLflow are not installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback
import warnings
from contextlib import nullcontext

import torch

from s2v_core.legacy import LegacyConvTokenizer
from s2v_core.losses import dash_infonce
from s2v_core.modalities import MODALITY_KEYS, get_modality
from s2v_core.model import SleepEncoder, count_parameters, model_config
from s2v_core.objective import load_objective

#: Local windows per step on CUDA (project preset: all nine modalities); the paper
#: preset encodes two modalities, so it gets 4x the windows for a similar token count,
#: and 320 at 120 epochs (the authors' per-process batch).
CUDA_WINDOWS = {"small": 512, "base": 256, "large": 128, "base@120": 32}
PAPER_FACTOR, PAPER_WINDOWS_120 = 4, 320
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
EMULATED_WORLD = 2


def make_batch(
    windows: int, epochs: int, device: torch.device, modalities=MODALITY_KEYS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random signals of ``modalities`` (all present) and metadata, made on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    batch = {
        k: torch.randn(windows, epochs, get_modality(k).samples_per_epoch, generator=generator, device=device)
        for k in modalities
    }
    present = torch.zeros(windows, len(MODALITY_KEYS), dtype=torch.bool, device=device)
    present[:, [MODALITY_KEYS.index(k) for k in modalities]] = True
    batch.update(
        present=present,
        age=20 + 60 * torch.rand(windows, generator=generator, device=device),
        sex=torch.randint(0, 2, (windows,), generator=generator, device=device).float(),
        site_id=torch.randint(0, 3, (windows,), generator=generator, device=device),
        night_id=torch.arange(windows, device=device) // 2,  # two windows per night
        history=torch.randint(0, 2, (windows, 2), generator=generator, device=device).float(),
    )
    return batch


def emulated_gather(world: int):
    """Rank 0's view of an all_gather over ``world`` workers holding other nights (stand-ins)."""

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        parts = [tensor]
        for r in range(1, world):
            other = tensor.detach().roll(r, dims=0)
            parts.append(other + r * 1_000_003 if not tensor.is_floating_point() else other)
        return torch.cat(parts)

    return gather


class Clock:
    """Wall time of a function, synchronising the device around it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def best(self, functions: dict[str, object], repeats: int, inner: int) -> dict[str, float]:
        """Best mean seconds per call of each function over ``repeats`` rounds of ``inner`` calls, interleaved."""
        for fn in functions.values():
            fn()
            fn()
        best = {name: math.inf for name in functions}
        for _ in range(repeats):
            for name, fn in functions.items():
                self.sync()
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                self.sync()
                best[name] = min(best[name], (time.perf_counter() - start) / inner)
        return best


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``fn()``."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def count_host_syncs(fn) -> dict[str, object]:
    """Synchronising CUDA calls in ``fn()`` ("warn" mode; where they come from), and "error" mode's verdict."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sources = sorted({f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}" for w in syncs})[:5]
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        verdict = "ok"
    except RuntimeError as error:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        verdict = f"raised at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}: {str(error).splitlines()[0][:160]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"host_syncs_per_step": len(syncs), "sync_sources": sources, "sync_error_mode": verdict}


class Setup:
    """Model, optimiser, batch and step functions of one (size, preset) configuration."""

    def __init__(
        self,
        size: str,
        epochs: int,
        preset_name: str,
        windows: int,
        device: torch.device,
        amp: bool,
        legacy_stems: bool = False,
    ) -> None:
        preset = load_objective(preset_name)
        self.objective = preset.objective
        torch.manual_seed(0)
        config = model_config(size, epochs_per_window=epochs, **{**preset.model_overrides(), "modality_dropout": 0.0})
        self.model = SleepEncoder(config).to(device).train()
        if legacy_stems:
            for key in self.model.tokenizers:
                self.model.tokenizers[key] = LegacyConvTokenizer(
                    get_modality(key).samples_per_epoch, config.width, config.stem_channels
                ).to(device)
        self.config, self.device, self.windows, self.epochs = config, device, windows, epochs
        self.modalities = self.objective.step_modalities(MODALITY_KEYS, seed=0, step=0)
        self.batch = make_batch(windows, epochs, device, self.modalities)
        self.world = EMULATED_WORLD if self.objective.negatives == "global" else 1
        self.loss_options = {
            **self.objective.loss_options(),
            "rank": 0,
            "world_size": self.world,
            "gather": emulated_gather(self.world) if self.world > 1 else None,
        }
        self.amp = amp
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), **fused)
        self.forward_loss = self._forward_loss

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            out = self.model.encode(batch, modalities=self.modalities, mask_rate=self.objective.mask_rate)
            return dash_infonce(
                out.per_modality, out.present, batch, logit_scale=out.logit_scale, **self.loss_options
            ).loss

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_loss(self.batch).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()

    def forward_backward(self) -> None:
        self.forward_loss(self.batch).backward()

    def loss_only(self):
        """The loss alone, forward + backward, on fixed embeddings of one encode."""
        with torch.no_grad(), self.autocast():
            out = self.model.encode(self.batch, modalities=self.modalities)
        leaves = {k: v.detach().float().requires_grad_() for k, v in out.per_modality.items()}
        scale = out.logit_scale.detach().requires_grad_()

        def run():
            for leaf in leaves.values():
                leaf.grad = None
            dash_infonce(leaves, out.present, self.batch, logit_scale=scale, **self.loss_options).loss.backward()

        return run

    def tokens(self) -> int:
        return self.windows * self.epochs * len(self.modalities)


def figures(seconds: float, flops: int, windows: int, peak: float | None, matmul: float) -> dict[str, float]:
    tflops = flops / seconds / 1e12
    return {
        "step_ms": round(1e3 * seconds, 2),
        "windows_per_s": round(windows / seconds, 2),
        "tflops": round(tflops, 3),
        "mfu_peak": round(tflops / peak, 4) if peak else None,
        "mfu_matmul": round(tflops / matmul, 4),
    }


def bench_run(
    size_spec: str,
    preset: str,
    args,
    device: torch.device,
    peak: float | None,
    matmul: float,
    compile_it: bool,
    clock: Clock,
) -> dict[str, object]:
    size, _, epoch_text = size_spec.partition("@")
    epochs = int(epoch_text) if epoch_text else args.epochs
    cuda = device.type == "cuda"
    if cuda:
        windows = CUDA_WINDOWS.get(size_spec, CUDA_WINDOWS.get(size, 64))
        if preset == "paper":
            windows = PAPER_WINDOWS_120 if epochs >= 120 else windows * PAPER_FACTOR
        windows = max(2, int(windows * args.windows_scale))
    else:
        windows = args.windows
    setup = Setup(size, epochs, preset, windows, device, amp=cuda)
    flops = count_flops(setup.forward_backward)
    setup.model.zero_grad(set_to_none=True)
    activations = saved_bytes(lambda: setup.forward_loss(setup.batch))
    functions = {"step": setup.step, "dash": setup.loss_only()}
    old = None
    if not cuda and setup.config.tokenizer == "conv" and not args.skip_old:
        old = Setup(size, epochs, preset, windows, device, amp=False, legacy_stems=True)
        functions["old_step"] = old.step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    inner = args.inner if cuda else 1
    times = clock.best(functions, args.repeats, inner)
    result: dict[str, object] = {
        "size": size,
        "preset": preset,
        "epochs_per_window": epochs,
        "local_windows": windows,
        "global_windows": windows * setup.world,
        "modalities_encoded": len(setup.modalities),
        "tokens_per_step": setup.tokens(),
        "tokenizer": setup.config.tokenizer,
        "parameters_non_embedding": count_parameters(setup.model),
        "parameters_total": count_parameters(setup.model, non_embedding=False),
        "flops_per_step": flops,
        "saved_activation_mb": round(activations / 2**20, 1),
        "eager": figures(times["step"], flops, windows, peak, matmul),
        "dash_loss_ms": round(1e3 * times["dash"], 2),
        "dash_share": round(times["dash"] / times["step"], 4),
    }
    if cuda:
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result.update(count_host_syncs(setup.step))
    if old is not None:
        result["old_conv"] = {
            "step_ms": round(1e3 * times["old_step"], 2),
            "windows_per_s": round(windows / times["old_step"], 2),
            "new_over_old": round(times["old_step"] / times["step"], 3),
        }
        del old
    if compile_it:
        result["compiled"] = bench_compiled(setup, flops, peak, matmul, args, clock, times["step"])
    setup = None  # free the model before the next size (the closures above are done with it)
    if cuda:
        torch.cuda.empty_cache()
    return result


def bench_compiled(
    setup: Setup, flops: int, peak: float | None, matmul: float, args, clock: Clock, eager_s: float
) -> dict[str, object]:
    torch._dynamo.reset()
    setup.forward_loss = torch.compile(setup._forward_loss, dynamic=False)
    start = time.perf_counter()
    setup.step()
    clock.sync()
    compile_s = time.perf_counter() - start
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = clock.best({"step": setup.step}, args.repeats, args.inner if cuda else 1)["step"]
    out = {
        **figures(seconds, flops, setup.windows, peak, matmul),
        "compile_s": round(compile_s, 1),
        "gain_over_eager": round(eager_s / seconds, 3),
    }
    if cuda:
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out.update(count_host_syncs(setup.step))
    return out


def graph_breaks(preset: str, device: torch.device) -> int:
    torch._dynamo.reset()
    setup = Setup("tiny", 4, preset, 4, device, amp=device.type == "cuda")
    explanation = torch._dynamo.explain(setup._forward_loss)(setup.batch)
    torch._dynamo.reset()
    return explanation.graph_break_count


def long_context(device: torch.device, clock: Clock, args) -> dict[str, object]:
    """The paper preset's loss alone at 120 epochs and an emulated 8-worker global batch: chunked vs not."""
    cuda = device.type == "cuda"
    windows, world, epochs, dim = (PAPER_WINDOWS_120 if cuda else 16), 8, 120, 128
    generator = torch.Generator().manual_seed(1)
    present = torch.ones(windows, len(MODALITY_KEYS), dtype=torch.bool, device=device)
    z = {
        k: torch.nn.functional.normalize(torch.randn(windows, epochs, dim, generator=generator), dim=-1).to(device)
        for k in ("eeg", "ecg")
    }
    meta = make_batch(windows, 1, device, ("hr",))
    objective = load_objective("paper").objective
    out: dict[str, object] = {
        "preset": "paper",
        "epochs_per_window": epochs,
        "local_windows": windows,
        "global_windows": windows * world,
    }
    for label, chunk in (("unchunked", None), ("chunked", objective.epoch_chunk or 30)):
        leaves = {k: v.clone().requires_grad_() for k, v in z.items()}

        def run(leaves=leaves, chunk=chunk):  # bound now: the loop variables change
            for leaf in leaves.values():
                leaf.grad = None
            dash_infonce(
                leaves,
                present,
                meta,
                logit_scale=torch.tensor(math.log(5.0), device=device),
                config=objective.dash_config,
                negatives="global",
                rank=0,
                world_size=world,
                gather=emulated_gather(world),
                epoch_chunk=chunk,
            ).loss.backward()

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        seconds = clock.best({"loss": run}, args.repeats, 1)["loss"]
        entry = {
            "epoch_chunk": chunk,
            "loss_ms": round(1e3 * seconds, 2),
            "saved_activation_mb": round(saved_bytes(run) / 2**20, 1),
        }
        if cuda:
            entry["peak_memory_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        out[label] = entry
    return out


def measure_matmul(device: torch.device, clock: Clock) -> tuple[float, str]:
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = clock.best({"mm": lambda: a @ b}, 5, 10 if device.type == "cuda" else 1)["mm"]
    return 2 * n**3 / seconds / 1e12, f"{str(dtype).removeprefix('torch.')} {n}^3"


def emit(result: dict[str, object], path: str | None, started: float) -> None:
    """Record the elapsed time and rewrite ``--out`` (so that a killed run leaves what it measured)."""
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    if path:
        with open(path + ".tmp", "w", encoding="utf-8") as stream:
            json.dump(result, stream)
        os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma list, size[@epochs] (default cpu: tiny,small; cuda: base,large,small,base@120)",
    )
    parser.add_argument("--presets", default="project,paper", help="objective presets (default project,paper)")
    parser.add_argument("--windows", type=int, default=8, help="local windows per step on CPU (default 8)")
    parser.add_argument("--windows-scale", type=float, default=1.0, help="scale the CUDA batch table")
    parser.add_argument("--epochs", type=int, default=10, help="30-s epochs per window (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (best kept)")
    parser.add_argument("--inner", type=int, default=3, help="steps per timed round on CUDA")
    parser.add_argument(
        "--compile-sizes",
        default=None,
        help="sizes also measured compiled (default cpu: tiny; cuda: base), '' for none; "
        "runs go in --sizes order while the budget lasts",
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=math.inf,
        help="start no run (or compiled measurement) that the estimates say would end past this",
    )
    parser.add_argument(
        "--compile-estimate",
        type=float,
        default=75.0,
        help="seconds a run with a compiled measurement is assumed to take (budget check)",
    )
    parser.add_argument(
        "--eager-estimate", type=float, default=15.0, help="seconds an eager-only run is assumed to take (budget check)"
    )
    parser.add_argument("--skip-old", action="store_true", help="skip the CPU old-conv comparison")
    parser.add_argument("--skip-long-context", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", default=None, help="also write the JSON here, rewritten after every run")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # CUDA sizes in priority order (the budget cuts from the end): the MFU targets first.
    sizes = (args.sizes or ("base,large,small,base@120" if cuda else "tiny,small")).split(",")
    compile_sizes = [
        s
        for s in (args.compile_sizes if args.compile_sizes is not None else ("base" if cuda else "tiny")).split(",")
        if s
    ]
    presets = args.presets.split(",")
    clock = Clock(device)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if cuda else None
    matmul, matmul_what = measure_matmul(device, clock)
    result: dict[str, object] = {
        "benchmark": "bench_model",
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast, fp32 loss" if cuda else "fp32",
        "peak_tflops": peak,
        "peak_source": "dense bf16 table: H100/H200 989, A100 312" if peak else None,
        "matmul_tflops": round(matmul, 3),
        "matmul": matmul_what,
        "emulated_world_for_global_negatives": EMULATED_WORLD,
        "graph_breaks": {p: graph_breaks(p, device) for p in presets},
        "runs": [],
        "skipped": [],
    }
    for size in sizes:
        for preset in presets:
            spent = time.perf_counter() - started
            if spent + args.eager_estimate > args.budget_seconds:
                result["skipped"].append(f"{size}/{preset}: budget")
                continue
            compile_it = size in compile_sizes and spent + args.compile_estimate <= args.budget_seconds
            if size in compile_sizes and not compile_it:
                result["skipped"].append(f"compiled {size}/{preset}: budget")
            try:
                result["runs"].append(bench_run(size, preset, args, device, peak, matmul, compile_it, clock))
            except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # report it, go on with the others
                result["runs"].append({"size": size, "preset": preset, "error": str(error).splitlines()[0][:300]})
                torch._dynamo.reset()
                if cuda:
                    torch.cuda.empty_cache()
            emit(result, args.out, started)
    if not args.skip_long_context:
        try:
            result["long_context"] = long_context(device, clock, args)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            result["long_context"] = {"error": str(error).splitlines()[0][:300]}
    emit(result, args.out, started)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
