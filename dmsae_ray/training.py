"""Ray Train: the SAE trained data-parallel (DDP) over the streamed activations.

The step itself is ``trainer.SAETrainer``; this module adds the worker loop (dataset shard,
DDP, checkpoints every ``train.checkpoint_every`` steps, metrics via ``ray.train.report``) and
the driver call. A worker failure restarts the group from the latest checkpoint
(``FailureConfig``); a driver restart finds the same checkpoints under the run directory.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dmsae_ray.buffer import CachedActivations, shuffled_batches
from dmsae_ray.config import RunConfig, validate
from dmsae_ray.coordinator import NAMESPACE
from dmsae_ray.core import Core, build_sae
from dmsae_ray.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.trainer import MetricWindow, SAELoss, SAETrainer

FAULT_ENV = "DMSAE_FAULT_INJECT_STEP"  # tests: fail once at this step, before any checkpoint


def _batches(
    shard, batch_size: int, device: torch.device, seed: int, cache_bytes: int, done: int = 0
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
    """
    def to_device(x: Tensor) -> Tensor:
        # Pinned host memory lets the copy to the GPU overlap the previous step.
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x

    def stream() -> Iterator[dict[str, Tensor]]:
        dtypes = {"x": torch.float32, "pos": torch.int64}
        return iter(shard.iter_torch_batches(batch_size=batch_size, dtypes=dtypes))

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
    cfg = validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    core = None
    if config["core"] is not None:
        vectors, bias = (torch.from_numpy(config["core"][k]) for k in ("vectors", "bias"))
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
        print(f"[cycle {config['cycle']}] resuming from step {trainer.step_count}", flush=True)
    shard = ray.train.get_dataset_shard("train")
    batches = _batches(
        shard, per_worker, device, seed, cfg.train.epoch_cache_mb * 2**20, trainer.step_count
    )
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
    fail_at = config.get("fail_at_step")
    label = f"[cycle {config['cycle']}] "
    total = trainer.total_steps
    resumed_from = trainer.step_count
    window = MetricWindow(cfg.train.log_every)
    for step in range(trainer.step_count + 1, total + 1):
        if fail_at is not None and ckpt is None and step == fail_at and rank == 0:
            raise RuntimeError(f"injected worker failure at step {step} ({FAULT_ENV})")
        window.add(trainer.step(next(batches)))
        if step % cfg.train.log_every == 0 and step < total:
            _report(trainer, window, rank, step % cfg.train.checkpoint_every == 0)
            if rank == 0:
                print(window.line(label, step, total), flush=True)
                if coordinator:
                    coordinator.set_progress.remote(tokens_done=step * cfg.train.batch_size)
    metrics = window.mean() | {"steps": total, "resumed_from": resumed_from}
    if rank == 0:
        save_final(sae, Path(config["final_dir"]), metrics)
    _report(trainer, window, rank, checkpoint=True, final=True, resumed_from=resumed_from)


def _report(
    trainer: SAETrainer,
    window: MetricWindow,
    rank: int,
    checkpoint: bool,
    final: bool = False,
    resumed_from: int = 0,
) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    metrics = window.mean() | {
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


def save_final(sae: MatryoshkaBatchTopKSAE, out: Path, metrics: dict) -> None:
    """The trained SAE, written where the driver reads it (shared storage on a cluster)."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    save_file(state, str(tmp / "sae.safetensors"))
    (tmp / "sae.json").write_text(json.dumps(sae.hparams()))
    (tmp / "metrics.json").write_text(json.dumps(metrics))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def load_final(out: Path) -> tuple[MatryoshkaBatchTopKSAE, dict]:
    hp = json.loads((out / "sae.json").read_text())
    sae = MatryoshkaBatchTopKSAE.from_state(hp, load_file(str(out / "sae.safetensors")))
    return sae, json.loads((out / "metrics.json").read_text())


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
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.ray
    fail_at = os.environ.get(FAULT_ENV)
    storage = run_root.resolve() / "ray_train"
    final_dir = storage / f"cycle-{cycle:03d}" / "final"
    resources = {"CPU": r.cpus_per_worker} | ({"GPU": 1} if r.use_gpu else {})
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
        },
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"cycle-{cycle:03d}",  # stable: a rerun resumes from this cycle's checkpoints
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=600),
        datasets={"train": dataset},
    )
    trainer.fit()
    sae, metrics = load_final(final_dir)
    return sae.eval(), metrics
