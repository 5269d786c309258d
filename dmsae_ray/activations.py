"""Ray Data: token blocks -> ActivationWorker actor pool (the LM up to layer L) -> activations.

Token blocks are written once per run as parquet under the run directory (the same training
tokens every cycle). Activations stream from the actor pool straight into the Ray Train workers;
with ``data.cache_activations`` they are written to parquet once and read back every cycle.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch import Tensor

from dmsae_ray.buffer import block_activations
from dmsae_ray.config import ModelConfig, RunConfig
from dmsae_ray.lm import load_lm

BLOCKS_PER_FILE = 4096


def write_token_blocks(
    blocks: Iterator[Tensor], out_dir: Path, max_blocks: int, log: Callable[[str], None]
) -> int:
    """Parquet shards of fixed-length blocks, written into a temp dir then renamed."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    buf: list[Tensor] = []
    n, shard = 0, 0

    def flush() -> None:
        nonlocal buf, shard
        arr = torch.stack(buf).numpy().astype(np.int32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])
        pq.write_table(pa.table({"ids": col}), tmp / f"blocks-{shard:05d}.parquet")
        buf, shard = [], shard + 1

    for block in blocks:
        buf.append(block)
        n += 1
        if len(buf) == BLOCKS_PER_FILE:
            flush()
            log(f"tokenized {n}/{max_blocks} blocks")
        if n >= max_blocks:
            break
    if buf:
        flush()
    if n == 0:
        raise ValueError("no training blocks to write")
    os.replace(tmp, out_dir)
    log(f"tokenized {n} training blocks -> {out_dir}")
    return n


def blocks_needed(cfg: RunConfig) -> int:
    return math.ceil(cfg.train.tokens_per_cycle / (cfg.data.context_length - 1))


def stack_ids(column: np.ndarray) -> np.ndarray:
    # parquet fixed-size lists arrive as an object array of rows
    return np.stack(column) if column.dtype == object else column


class ActivationWorker:
    """Loads the LM once per actor and runs it only up to the hooked layer."""

    def __init__(self, model: dict, layer: int, specials: list[int]) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model = load_lm(ModelConfig.model_validate(model))
        self.layer, self.specials = layer, specials

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(stack_ids(batch["ids"]).astype(np.int64))
        return {"x": block_activations(self.model, ids, self.layer, self.specials).numpy()}


def activation_dataset(cfg: RunConfig, tokens_dir: Path, specials: list[int]) -> ray.data.Dataset:
    use_gpu = cfg.ray.use_gpu
    return ray.data.read_parquet(str(tokens_dir), partitioning=None).map_batches(
        ActivationWorker,
        fn_constructor_kwargs={
            "model": cfg.model.model_dump(), "layer": cfg.model.layer, "specials": specials,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.ray.activation_actors),
        batch_size=cfg.data.llm_batch_size,
        batch_format="numpy",
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
    )


def cached_dataset(ds: ray.data.Dataset, cache_dir: Path, log: Callable[[str], None]):
    """Write the activations once (temp dir + rename), then always read them back."""
    if not cache_dir.is_dir():
        tmp = cache_dir.with_name(cache_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"caching activations -> {cache_dir}")
        ds.write_parquet(str(tmp))
        os.replace(tmp, cache_dir)
    # partitioning=None: a run_dir like runs/tau=0.5 is not a hive partition column
    return ray.data.read_parquet(str(cache_dir), partitioning=None)
