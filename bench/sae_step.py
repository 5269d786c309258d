"""SAE training step: dmsae-ray (sparse fast path, dense eager reference) vs SAELens.

One step = forward + backward + optimiser, exactly as each project's trainer runs it:
ours through ``SAETrainer.step`` (loss, decoder-parallel gradient removal, clip, Adam, LR
schedule, decoder renormalisation, threshold EMA); SAELens through the body of
``SAETrainer._train_step`` (``training_forward_pass``, firing statistics, backward, clip, Adam,
schedule), on its ``MatryoshkaBatchTopKTrainingSAE`` with the same nested widths.
Both get the same random activations (E||x||^2 = 1), k, width and batch. Every run is a fresh
subprocess (so its peak memory is its own), the implementations are interleaved in rotating
order across repeats, and each number is the median over repeats of the per-run median step.

    python bench/sae_step.py                 # --quick: the headline configs
    python bench/sae_step.py --full          # d_in x width x k x batch grid
    python bench/sae_step.py --d-in 2304 --width 65536 --k 320 --batch 4096 --impl fast saelens
    python bench/sae_step.py --device cuda --compile     # bf16 autocast on a GPU
    python bench/sae_step.py --device cuda --peak-tflops 989   # + achieved TFLOP/s, % of peak

Achieved TFLOP/s counts the GEMM-sized products each implementation runs per step (``step_flops``;
element-wise passes, the top-k, Adam and the small frozen core are left out), divided by the
median step time. With B the batch, d the input width, K the width and k the target L0 (so
k*B selected entries; a dynamic budget with a core gives the non-core slightly fewer):

    fast:           2*B*d*(K - c)    the encoder GEMM, forward only (no autograd through it)
                  + 4 * 2*k*B*d      four sparse products: the decoder (CSR x W_dec), its value
                                     gradient (SDDMM), its weight gradient (S^T G) and the encoder
                                     weight gradient ((x - b_dec)^T S_g)
    eager, saelens: 6 * 2*B*d*K      encoder forward, its weight and input gradients (b_dec
                                     requires the latter), decoder forward and its two gradients

SAELens also decodes every inner Matryoshka level separately; those partial products are not
counted, so its figure is a lower bound. Under bf16 autocast the GEMMs run in bf16 while the fast
path's sparse products stay fp32 (torch's sparse kernels take no bf16), so ``--peak-tflops``
should be the device's dense bf16 peak: 989 TFLOP/s for an H100/H200 SXM (NVIDIA's figure
without structured sparsity; about 790 is what a large bf16 matmul reaches there in practice).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MemoryPeak, fmt_table, median, print_header, run_worker  # noqa: E402
from gpu_check_results import finite  # noqa: E402  (one NaN-to-null rule for both files)

FRACS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]  # the config default (docs/algorithm.md 2)
IMPLS = ("fast", "eager", "saelens")
# --quick: the stories15M shape at a small width, and the Gemma-2-2B layer-12 shape the
# targets are stated for (d_in 2304, width 16384, k 320).
QUICK = [(288, 4096, 32, 2048), (2304, 16384, 320, 4096)]
FULL_GRID = dict(d_in=[288, 2304], width=[4096, 16384, 65536], k=[32, 320], batch=[2048, 4096])


def step_flops(impl: str, d_in: int, width: int, k: int, batch: int, core: int = 0) -> float:
    """FLOPs of the GEMM-sized products of one training step (formulas in the module doc)."""
    if impl == "fast":
        return 2.0 * batch * d_in * (width - core) + 4 * 2.0 * k * batch * d_in
    return 6 * 2.0 * batch * d_in * width


# -- worker: one implementation, one config, in its own process ------------------------------
def make_batches(d_in: int, batch: int, seed: int, n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d_in, generator=gen) / math.sqrt(d_in) for _ in range(n)]


def ours_step(spec: dict, device: torch.device):
    from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
    from dmsae_ray.algo.trainer import SAELoss, SAETrainer
    from dmsae_ray.config import SAEConfig, TrainConfig

    d_in, width, k, batch, core = (spec[key] for key in ("d_in", "width", "k", "batch", "core"))
    sae = MatryoshkaBatchTopKSAE(d_in, width, k, core, group_fractions=FRACS)
    if core:
        cols = torch.randn(d_in, core) / math.sqrt(d_in)
        sae.set_core(cols, torch.zeros(core, dtype=torch.long), torch.arange(core), tied=True)
    sae.fast = spec["impl"] == "fast"
    sae.to(device)
    # threshold_start_step 0: the steady-state step, threshold EMA included.
    cfg = SAEConfig(width=width, k=k, threshold_start_step=0)
    train = TrainConfig(tokens_per_cycle=batch * 10**6, batch_size=batch, warmup_steps=0)
    loss: torch.nn.Module = SAELoss(sae, cfg)
    if spec["compile"]:
        loss = torch.compile(loss)
    # Wrapped to apply autocast around the (possibly compiled) loss.
    wrapped = LossWrapper(loss, device.type if spec["autocast"] else None)
    trainer = SAETrainer(sae, cfg, train, loss_module=wrapped)
    return trainer.step


class LossWrapper(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, autocast_device: str | None) -> None:
        super().__init__()
        self.inner, self.autocast_device = inner, autocast_device

    def forward(self, x: torch.Tensor):
        if self.autocast_device is None:
            return self.inner(x)
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
            return self.inner(x)


def saelens_step(spec: dict, device: torch.device):
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    from dmsae_ray.algo.sae import group_sizes

    d_in, width, k = (spec[key] for key in ("d_in", "width", "k"))
    # SAELens has no frozen core: its levels are our group ends at core size 0.
    ends = list(itertools.accumulate(group_sizes(width, 0, FRACS)))
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=d_in, d_sae=width, k=k, matryoshka_widths=ends, device=str(device)
    )
    sae = MatryoshkaBatchTopKTrainingSAE(cfg).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # their "constant"
    fwd = torch.compile(sae.training_forward_pass) if spec["compile"] else sae.training_forward_pass
    since_fired = torch.zeros(width, device=device)
    act_freq = torch.zeros(width, device=device)
    dead_window = 1000  # SAETrainerConfig.dead_feature_window
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["autocast"])

    def step(x: torch.Tensor):
        # sae_lens/training/sae_trainer.py SAETrainer._train_step (6.54), minus wandb logging.
        sae.train()
        with autocast:
            out = fwd(
                TrainStepInput(
                    sae_in=x,
                    coefficients={},  # get_coefficients() is {} for (batch)top-k SAEs
                    dead_neuron_mask=(since_fired > dead_window).bool(),
                    n_training_steps=0,
                    is_logging_step=False,
                )
            )
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                did_fire = firing.sum(-2).bool()
                since_fired.add_(1)
                since_fired[did_fire] = 0
                act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        return out

    return step


def worker(spec: dict) -> dict:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    host = make_batches(spec["d_in"], spec["batch"], spec["seed"])
    if device.type == "cuda":
        # Page-locked host batches: the copy to the GPU is a non-blocking DMA.
        host = [h.pin_memory() for h in host]
    mem = MemoryPeak(spec["device"])
    mem.start()
    build = saelens_step if spec["impl"] == "saelens" else ours_step
    step = build(spec, device)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        x_host = host[i % len(host)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(x_host.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    return {"times": times, "peak_mb": mem.peak_delta_mb(), "threads": torch.get_num_threads()}


# -- driver ------------------------------------------------------------------------------------
def saelens_status() -> str | None:
    """None when SAELens' Matryoshka training SAE imports, else why not."""
    if importlib.util.find_spec("sae_lens") is None:
        return "sae-lens is not installed (see BENCHMARKS.md for installing it next to torch)"
    try:
        from sae_lens.saes.matryoshka_batchtopk_sae import (  # noqa: F401
            MatryoshkaBatchTopKTrainingSAE,
        )
    except Exception as exc:  # any import failure: skip that side, say why
        return f"sae_lens does not import: {exc!r}"
    return None


def configs(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    picked = any(v is not None for v in (args.d_in, args.width, args.k, args.batch))
    if args.full or picked:
        grid = {key: getattr(args, key) or FULL_GRID[key] for key in FULL_GRID}
        if not args.full and not args.batch:
            grid["batch"] = [4096]
        return list(itertools.product(grid["d_in"], grid["width"], grid["k"], grid["batch"]))
    return QUICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the headline configs (default)")
    mode.add_argument("--full", action="store_true", help="the whole grid")
    ap.add_argument("--d-in", type=int, nargs="+")
    ap.add_argument("--width", type=int, nargs="+")
    ap.add_argument("--k", type=int, nargs="+")
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--core", type=int, default=0, help="frozen core size (ours only)")
    ap.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per implementation")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="bf16: the step under bf16 autocast; auto: bf16 on CUDA, fp32 elsewhere",
    )
    ap.add_argument("--tflops", action="store_true", help="add achieved TFLOP/s to the table")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak for the precision (H100/H200 SXM dense bf16: 989); adds the "
        "fraction of it to the table and the JSON",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the loss / forward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    print_header("SAE training step (forward + backward + optimiser)", args.device)
    if args.threads:
        print(f"threads per run: {args.threads} (--threads)\n")
    impls = list(args.impl)
    if "saelens" in impls:
        if why := saelens_status():
            print(f"SKIPPING the SAELens side: {why}\n")
            impls.remove("saelens")
        else:
            import sae_lens

            print(f"sae-lens {sae_lens.__version__}\n")
    if args.compile and args.warmup < 3:
        args.warmup = 3  # the first steps compile
    autocast = args.precision == "bf16" or (
        args.precision == "auto" and args.device.startswith("cuda")
    )
    print(f"precision: {'bf16 autocast' if autocast else 'fp32'}\n")
    results = []
    for d_in, width, k, batch in configs(args):
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for r in range(args.repeats):
            for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:  # rotate the order
                spec = dict(
                    impl=impl, d_in=d_in, width=width, k=k, batch=batch, core=args.core,
                    steps=args.steps, warmup=args.warmup, device=args.device, seed=0,
                    compile=args.compile, autocast=autocast,
                    threads=args.threads,
                )  # fmt: skip
                runs[impl].append(run_worker(Path(__file__), spec, args.timeout))
        row = {
            "d_in": d_in, "width": width, "k": k, "batch": batch,
            "precision": "bf16" if autocast else "fp32",
        }  # fmt: skip
        for impl, outs in runs.items():
            errors = [o["error"] for o in outs if "error" in o]
            ok = [o for o in outs if "error" not in o]
            if errors:
                print(f"  {impl} d_in={d_in} width={width} k={k} batch={batch}: {errors[0]}")
            step_s = median([median(o["times"]) for o in ok])
            flops = step_flops(impl, d_in, width, k, batch, args.core)
            tflops = flops / step_s / 1e12 if ok else float("nan")
            row[impl] = {
                "step_s": step_s,
                "tokens_per_s": batch / step_s if ok else float("nan"),
                "peak_mb": median([o["peak_mb"] for o in ok]),
                "flops": flops,
                "tflops": tflops,
                "frac_peak": tflops / args.peak_tflops if args.peak_tflops else None,
                "runs": [o.get("times") for o in outs],
                "errors": errors,
            }
        results.append(row)
        print_row(row, impls)
        if args.json:  # after every config: a run cut short keeps the configs it finished
            args.json.write_text(json.dumps(finite(results), indent=1))
    print()
    print(table(results, impls, args.tflops or bool(args.peak_tflops)))


def print_row(row: dict, impls: list[str]) -> None:
    parts = [f"{impl} {row[impl]['step_s'] * 1e3:.0f} ms" for impl in impls]
    print(f"d_in={row['d_in']} width={row['width']} k={row['k']} batch={row['batch']}: "
          + ", ".join(parts), flush=True)  # fmt: skip


def table(results: list[dict], impls: list[str], tflops: bool = False) -> str:
    header = ["d_in", "width", "k", "batch"]
    peak = tflops and any(res[i]["frac_peak"] is not None for res in results for i in impls)
    for impl in impls:
        header += [f"{impl} ms/step", f"{impl} tok/s", f"{impl} peak MB"]
        header += [f"{impl} TFLOP/s"] if tflops else []
        header += [f"{impl} % peak"] if peak else []
    if "fast" in impls:
        header += [f"{other}/fast" for other in impls if other != "fast"]
    rows = []
    for res in results:
        cells = [str(res[key]) for key in ("d_in", "width", "k", "batch")]
        for impl in impls:
            r = res[impl]
            cells += [f"{r['step_s'] * 1e3:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_mb']:.0f}"]
            cells += [f"{r['tflops']:.3g}"] if tflops else []
            cells += [f"{100 * r['frac_peak']:.1f}"] if peak else []
        if "fast" in impls:
            # Time ratio: how many times longer the other step takes than ours.
            cells += [
                f"{res[o]['step_s'] / res['fast']['step_s']:.2f}x" for o in impls if o != "fast"
            ]
        rows.append(cells)
    return fmt_table(header, rows)


if __name__ == "__main__":
    main()
