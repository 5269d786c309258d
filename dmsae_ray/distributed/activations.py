"""Ray Data: token blocks -> ActivationWorker actor pool (the LM up to layer L) -> activations.

Token blocks are written once per run as parquet under the run directory (the same training
tokens every cycle). Activations stream from the actor pool straight into the Ray Train workers;
with ``data.cache_activations`` they are written to parquet once and read back every cycle:
the activation cache both backends share (``activation_cache.py``: location, format, commit),
written here through Ray Data.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data.expressions import col
from torch import Tensor

from dmsae_ray import storage
from dmsae_ray.config import ModelConfig, RunConfig
from dmsae_ray.model.lm import load_lm
from dmsae_ray.run.activation_cache import ActivationCache
from dmsae_ray.run.buffer import block_activations_at

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
        # The global block index travels with the block: activation rows get their position
        # in the token stream from it (Ray Data does not keep rows in order).
        first = shard * BLOCKS_PER_FILE
        index = pa.array(np.arange(first, first + len(buf), dtype=np.int64))
        table = pa.table({"ids": col, "block": index})
        pq.write_table(table, tmp / f"blocks-{shard:05d}.parquet")
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


def has_block_index(tokens_dir: Path) -> bool:
    files = sorted(Path(tokens_dir).glob("*.parquet"))
    return bool(files) and "block" in pq.read_schema(files[0]).names


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
        blocks = torch.from_numpy(batch["block"].astype(np.int64))
        x, pos = block_activations_at(self.model, ids, blocks, self.layer, self.specials)
        return {"x": x.numpy(), "pos": pos.numpy()}


def _first_blocks(n: int) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = batch["block"] < n
        return {k: v[mask] for k, v in batch.items()}

    return keep


def activation_dataset(
    cfg: RunConfig, tokens_dir: Path, specials: list[int], first_blocks: int | None = None
) -> ray.data.Dataset:
    """Rows ``{"x": activation, "pos": block * context_length + t}``, in no guaranteed order.
    ``first_blocks``: only the activations of the first n token blocks."""
    use_gpu = cfg.ray.use_gpu
    files = sorted(str(f) for f in Path(tokens_dir).glob("*.parquet"))
    if first_blocks is not None:
        files = files[: math.ceil(first_blocks / BLOCKS_PER_FILE)]
    ds = ray.data.read_parquet(files, partitioning=None)
    if first_blocks is not None:
        ds = ds.map_batches(_first_blocks(first_blocks), batch_format="numpy")
    return ds.map_batches(
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


def cached_dataset(
    ds: ray.data.Dataset,
    fs: pafs.FileSystem,
    path: str,
    key: dict,
    log: Callable[[str], None],
    retry: storage.Retry = storage.RETRY,
) -> ray.data.Dataset:
    """Write the activations ``ds`` into the cache at ``path`` once (``ActivationCache.open``:
    a fresh attempt directory, then the commit), then always read the committed attempt back.

    Every file and the commit are retried on transient store errors (``retry``); a store that
    keeps failing ends in a ``storage.StorageError``. A cache the in-process backend wrote
    holds rows past the key's blocks: only the key's blocks are read, as a Ray run writes them.
    """
    cache = ActivationCache(fs, path, key, retry)
    attempt = cache.open(lambda where: write_parquet(ds, fs, where, retry), log)
    # partitioning=None: a directory like runs/tau=0.5 is not a hive partition column
    out = ray.data.read_parquet(attempt.path, filesystem=fs, partitioning=None)
    end = cache.positions_end(attempt)
    return out if end is None else out.filter(expr=col("pos") < end)


def write_parquet(
    ds: ray.data.Dataset, fs: pafs.FileSystem, path: str, retry: storage.Retry
) -> None:
    """``ds.write_parquet`` where each file is retried whole (``storage.retrying``) on a store
    other than the local disk.

    Ray Data's own loop (each file up to 10 times, up to 32 s apart, on errors matching
    ``DataContext.retried_io_errors``) is off for this write: around ours it would multiply the
    attempts (a store that keeps failing would hold each file about four minutes, not eight
    seconds)."""
    if isinstance(fs, pafs.LocalFileSystem):
        ds.write_parquet(path, filesystem=fs)
        return
    ctx = ray.data.DataContext.get_current()
    saved = ctx.retried_io_errors
    _set_retried_io_errors(ctx, [])  # read by the datasink built below, pickled into its tasks
    try:
        ds.write_parquet(path, filesystem=storage.retrying(fs, retry))
    except Exception as err:
        cause = getattr(err, "cause", None)  # a RayTaskError carries the worker's exception
        if isinstance(cause, storage.StorageError):
            raise storage.StorageError(f"caching activations failed: {cause}") from err
        raise
    finally:
        _set_retried_io_errors(ctx, saved)


def _set_retried_io_errors(ctx: ray.data.DataContext, patterns: list[str]) -> None:
    with warnings.catch_warnings():  # "substring matching will be deprecated": none here
        warnings.filterwarnings("ignore", "`retried_io_errors`", DeprecationWarning)
        ctx.retried_io_errors = patterns
