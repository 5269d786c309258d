"""Ray Train: the SAE trained data-parallel (DDP) over the streamed activations.

The step and the loop are ``trainer.SAETrainer`` and ``trainer.run_steps``, as in the driver
without Ray; this module adds what a worker needs around them (dataset shard, DDP, the restore
from the latest checkpoint, ``ray.train.report`` with a checkpoint every
``train.checkpoint_every`` steps, the coordinator's progress) and the driver call, which reads
the trained SAE back from ``ray_train/cycle-NNN/final/`` (``sae_files``). A worker failure
restarts the group from the latest checkpoint (``FailureConfig``); a driver restart finds the
same checkpoints under the run directory.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor

from dmsae_ray.algo.core import Core, build_sae
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.algo.sae_files import load_sae, save_sae
from dmsae_ray.algo.trainer import MetricWindow, SAELoss, SAETrainer, run_steps
from dmsae_ray.config import RunConfig, validate
from dmsae_ray.distributed.coordinator import NAMESPACE
from dmsae_ray.distributed.ray_log import drop_known_noise
from dmsae_ray.run.buffer import CachedActivations, shuffled_batches

FAULT_ENV = "DMSAE_FAULT_INJECT_STEP"  # tests: fail once at this step, before any checkpoint


def _batches(
    shard,
    batch_size: int,
    device: torch.device,
    seed: int,
    cache_bytes: int,
    done: int = 0,
    keep: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[Tensor]:
    """Endless batches: a corpus smaller than the tokens of a cycle is read for several epochs.

    Ray Data hands rows on in an order that changes from run to run. When this worker's share
    fits in ``cache_bytes`` (as in every test and the embedded default), it is read whole,
    sorted by token-stream position and reshuffled from memory every epoch with a seeded
    generator: the same rows give the same batches in every run, and a cycle resumed after
    ``done`` steps skips exactly the batches already trained on (a cheap skip: permutations).
    A larger share streams (first epoch from what was read so far, then the rest) through a
    seeded shuffle buffer, in arrival order; a resumed cycle restarts that stream instead of
    skipping, since skipping would mean computing ``done`` batches of activations to drop them.

    ``keep`` (a mask of the rows' positions): the worker's share is the rows it keeps of an
    unsplit ``shard`` (``shard_by_block``), not the rows Ray Data happened to hand it.
    """
    def to_device(x: Tensor) -> Tensor:
        # Pinned host memory lets the copy to the GPU overlap the previous step.
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x

    def stream() -> Iterator[dict[str, Tensor]]:
        dtypes = {"x": torch.float32, "pos": torch.int64}
        batches = shard.iter_torch_batches(batch_size=batch_size, dtypes=dtypes)
        if keep is None:
            return iter(batches)
        masked = ((b, keep(b["pos"])) for b in batches)
        return ({k: v[m] for k, v in b.items()} for b, m in masked if m.any())

    first = stream()
    kept: list[dict[str, Tensor]] = []
    size = 0
    for b in first:
        kept.append(b)
        size += b["x"].numel() * b["x"].element_size()
        if size > cache_bytes:
            break
    else:
        if not kept:
            raise ValueError(f"the activation stream has fewer than {batch_size} rows")
        x = torch.cat([b["x"] for b in kept])
        x = x[torch.argsort(torch.cat([b["pos"] for b in kept]))].to(device)
        yield from itertools.islice(CachedActivations.epochs(x, batch_size, seed), done, None)
        return

    epoch: Iterator[dict[str, Tensor]] = itertools.chain(kept, first)
    for n in itertools.count():
        rows = (b["x"] for b in epoch)
        for x in shuffled_batches(rows, batch_size, 16 * batch_size, seed + 1000 * n):
            yield to_device(x)
        epoch = stream()


def train_loop_per_worker(config: dict) -> None:
    drop_known_noise()  # also on a cluster we did not start (no worker setup hook there)
    cfg = validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    core = None
    if config["core"] is not None:
        # A copy: arrays out of the object store are read-only, and torch warns about them.
        vectors, bias = (torch.tensor(config["core"][k]) for k in ("vectors", "bias"))
        core = Core(vectors, [tuple(i) for i in config["core_ids"]], bias)
    sae = build_sae(cfg, config["d_in"], config["cycle"], core).to(device)
    sae.fast = cfg.train.fast_path
    per_worker = max(1, cfg.train.batch_size // world)
    seed = cfg.train.seed + config["cycle"] + 7919 * rank
    trainer = SAETrainer(sae, cfg.sae, cfg.train, init_b_dec=False)
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            trainer.load_state_dict(torch.load(Path(d) / "trainer.pt", map_location=device))
        if rank == 0:
            say(f"[cycle {config['cycle']}] resuming from step {trainer.step_count}")
    shard = ray.train.get_dataset_shard("train")
    keep = None
    if config.get("shard_by_block"):
        blocks = cfg.data.context_length

        def keep(pos: Tensor) -> Tensor:
            return (pos // blocks) % world == rank

    cache_bytes = cfg.train.epoch_cache_mb * 2**20
    batches = _batches(shard, per_worker, device, seed, cache_bytes, trainer.step_count, keep)
    norm_factor = float(config["norm_factor"])
    batches = (x / norm_factor for x in batches)
    if not ckpt:
        first = next(batches)
        sae.init_b_dec(first)  # DDP's construction broadcasts rank 0's to every rank
        batches = itertools.chain([first], batches)
    trainer.loss_module = ray.train.torch.prepare_model(SAELoss(sae, cfg.sae))

    coordinator = None
    if rank == 0 and config.get("coordinator"):
        coordinator = ray.get_actor(config["coordinator"], namespace=NAMESPACE)
    label = f"[cycle {config['cycle']}] "
    total = trainer.total_steps
    resumed_from = trainer.step_count

    def on_interval(step: int, window: MetricWindow) -> None:
        if step == total:
            return  # the final report after the loop: the last checkpoint, with the SAE saved
        _report(trainer, window.mean(), rank, step % cfg.train.checkpoint_every == 0)
        if rank == 0:
            say(window.line(label, step, total))
            if coordinator:
                coordinator.set_progress.remote(tokens_done=step * cfg.train.batch_size)

    before_step = None
    fail_at = config.get("fail_at_step")
    if fail_at is not None and ckpt is None and rank == 0:
        # Once: the group restarted from a checkpoint does not fail again.
        def before_step(step: int) -> None:
            if step == fail_at:
                raise RuntimeError(f"injected worker failure at step {step} ({FAULT_ENV})")

    metrics = run_steps(trainer, batches, on_interval, before_step) | {"resumed_from": resumed_from}
    if rank == 0:
        save_sae(Path(config["final_dir"]), sae, metrics)
    mean = {k: v for k, v in metrics.items() if k in MetricWindow.KEYS}
    _report(trainer, mean, rank, checkpoint=True, final=True, resumed_from=resumed_from)


def say(line: str) -> None:
    """One line to the console, once. Not ``print``: Ray Train patches ``print`` in its worker
    and controller processes to log through the root logger, and since Ray's workers replace
    ``sys.stdout`` it also writes to it, so every printed line reached the log twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class FailureLine(ray.train.UserCallback):
    """A worker failure as one line that says a retry follows: the worker's traceback shows,
    but Train logs its decision to retry at INFO, which ``LoggingConfig(log_level="WARNING")``
    keeps off the console. Runs in the controller."""

    def __init__(self, cycle: int, max_failures: int) -> None:
        self.cycle, self.max_failures = cycle, max_failures

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, err in sorted(worker_exceptions.items()):
            # the last line of a traceback-bearing message: the exception itself
            last = (str(err).strip().splitlines() or [""])[-1]
            say(
                f"[cycle {self.cycle}] training worker {rank} failed: {last} (Ray Train "
                f"retries from the last checkpoint, up to ray.max_failures="
                f"{self.max_failures} times per cycle)"
            )


def _report(
    trainer: SAETrainer,
    mean: dict[str, float],
    rank: int,
    checkpoint: bool,
    final: bool = False,
    resumed_from: int = 0,
) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint. ``mean``: the
    metric window's mean (``MetricWindow.mean``)."""
    metrics = mean | {
        "step": trainer.step_count,
        "final": final,
        "resumed_from": resumed_from,
    }
    if rank != 0 or not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(trainer.state_dict(), Path(d) / "trainer.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def shard_by_block(cfg: RunConfig, dataset: ray.data.Dataset, d_in: int) -> bool:
    """Whether every training worker reads the whole dataset and keeps the token blocks
    ``b`` with ``b mod num_workers == rank``, instead of the rows Ray Data's split hands it.

    Ray Data's split hands each worker the blocks in the order the read tasks finish (a cache
    of several files: different rows every run), and its ``equal`` mode drops up to
    ``num_workers - 1`` rows: two runs with several workers then train on different batches.
    Sharding by block makes them repeatable bit for bit, and a worker group restarted from a
    checkpoint (a lost node) sees the batches of an uninterrupted run. Each worker then reads
    the whole dataset once per cycle, so it is done only where that read is bounded like a
    single worker's: parquet-cached activations (``data.cache_activations``; no LM runs again)
    that fit ``train.epoch_cache_mb`` as a whole. Otherwise the split stays (statistically
    repeatable runs).
    """
    if cfg.ray.num_workers < 2 or not cfg.data.cache_activations:
        return False
    rows = dataset.count()  # of the cached parquet: a short Ray Data job, no LM
    return rows * d_in * 4 <= cfg.train.epoch_cache_mb * 2**20  # float32, as workers hold it


def train_sae(
    cfg: RunConfig,
    run_root: Path,
    cycle: int,
    core: Core | None,
    norm_factor: float,
    d_in: int,
    dataset: ray.data.Dataset,
    coordinator: str | None,
) -> tuple[MatryoshkaBatchTopKSAE, dict]:
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.ray
    fail_at = os.environ.get(FAULT_ENV)
    storage = run_root.resolve() / "ray_train"
    final_dir = storage / f"cycle-{cycle:03d}" / "final"
    resources = {"CPU": r.cpus_per_worker} | ({"GPU": 1} if r.use_gpu else {})
    by_block = shard_by_block(cfg, dataset, d_in)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "cycle": cycle,
            "core": None if core is None else {
                "vectors": core.vectors.numpy().astype(np.float32),
                "bias": core.bias.numpy().astype(np.float32),
            },
            "core_ids": [] if core is None else [list(i) for i in core.ids],
            "norm_factor": norm_factor,
            "d_in": d_in,
            "coordinator": coordinator,
            "fail_at_step": int(fail_at) if fail_at else None,
            "final_dir": str(final_dir),
            "shard_by_block": by_block,
        },
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"cycle-{cycle:03d}",  # stable: a rerun resumes from this cycle's checkpoints
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Train's INFO lines (worker group started, a TrainingReport(...) dump per report,
            # checkpoint paths) stay in its log files; a failure is one line of ours instead.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[FailureLine(cycle, r.max_failures)],
        ),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=600),
        datasets={"train": dataset},
        # An unsplit dataset: each worker reads it whole and keeps its own blocks.
        dataset_config=DataConfig(
            datasets_to_split=[] if by_block else "all",
            # The ingest options Train would copy from this DataContext anyway, as they are:
            # Train 2.60 rebuilds them through the deprecated `exclude_resources` setter, which
            # warned in every cycle.
            execution_options=ray.data.DataContext.get_current().execution_options,
        ),
    )
    trainer.fit()
    # Every fit() ends with rank 0 writing final/ (a group resumed from the cycle's last
    # checkpoint runs no step but still writes it), so final/ is always in the format of this
    # code: a leftover in the format before sae_files.py (sae.safetensors, sae.json) is
    # replaced, never read.
    sae, metrics = load_sae(final_dir)
    return sae.eval(), metrics
