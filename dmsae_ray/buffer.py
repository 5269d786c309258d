"""Token blocks -> LM (stopped after layer L) -> shuffled, normalisable activation batches.

Plain PyTorch: the in-process path iterates it directly and the Ray Data actors call
``block_activations`` on their share of the blocks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dmsae_ray.config import RunConfig
from dmsae_ray.data import valid_mask
from dmsae_ray.lm import layer_activations


def blocks_needed(cfg: RunConfig) -> int:
    return math.ceil(cfg.train.tokens_per_cycle / (cfg.data.context_length - 1))


def cache_key(cfg: RunConfig) -> dict:
    """Everything the cached activations depend on: runs that agree on it share a cache."""
    data = cfg.data.model_dump(mode="json", exclude={"cache_activations", "activation_cache"})
    return {"model": cfg.model.model_dump(mode="json"), "data": data, "blocks": blocks_needed(cfg)}


def cache_digest(cfg: RunConfig) -> str:
    """The name of a shared cache's subdirectory (both backends)."""
    return hashlib.sha256(json.dumps(cache_key(cfg), sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def block_activations(model: nn.Module, ids: Tensor, layer: int, specials: list[int]) -> Tensor:
    """Activation rows [N_valid, d] (float32) of a batch of blocks, BOS/pad positions dropped."""
    return block_activations_at(model, ids, None, layer, specials)[0]


@torch.no_grad()
def block_activations_at(
    model: nn.Module, ids: Tensor, blocks: Tensor | None, layer: int, specials: list[int]
) -> tuple[Tensor, Tensor | None]:
    """``block_activations`` plus each row's position in the token stream,
    ``block * context_length + t`` for the blocks' global indices ``blocks``: Ray Data may hand
    rows on in any order, and the position is what puts them back in a fixed one."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = valid_mask(ids, specials)
    x = layer_activations(model, ids, layer)[mask].float().cpu()
    if blocks is None:
        return x, None
    t = ids.shape[1]
    pos = blocks.to(torch.int64)[:, None] * t + torch.arange(t, dtype=torch.int64)
    return x, pos[mask.cpu()]


def iter_activations(
    model: nn.Module,
    blocks: Iterable[Tensor],
    layer: int,
    specials: list[int],
    llm_batch_size: int,
) -> Iterator[Tensor]:
    batch: list[Tensor] = []
    for block in blocks:
        batch.append(block)
        if len(batch) == llm_batch_size:
            yield block_activations(model, torch.stack(batch), layer, specials)
            batch = []
    if batch:
        yield block_activations(model, torch.stack(batch), layer, specials)


def shuffled_batches(
    rows: Iterable[Tensor], batch_size: int, buffer_rows: int, seed: int
) -> Iterator[Tensor]:
    """Mix activations from many sequences in every batch (neighbouring tokens correlate)."""
    gen = torch.Generator().manual_seed(seed)
    pending: list[Tensor] = []
    size = 0

    def drain(keep: int) -> Iterator[Tensor]:
        nonlocal pending, size
        pool = torch.cat(pending)
        pool = pool[torch.randperm(len(pool), generator=gen)]
        n_out = (len(pool) - keep) // batch_size
        for i in range(n_out):
            yield pool[i * batch_size : (i + 1) * batch_size]
        rest = pool[n_out * batch_size :]
        pending, size = [rest], len(rest)

    for chunk in rows:
        pending.append(chunk)
        size += len(chunk)
        if size >= buffer_rows:
            yield from drain(keep=buffer_rows // 2)
    if size:
        yield from drain(keep=0)


class CachedActivations:
    """Activations of the training blocks computed once and reused every cycle (small runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file()

    def build(self, rows: Iterator[Tensor], max_rows: int, log: Callable[[str], None]) -> None:
        chunks, n, next_log, t0 = [], 0, 0, time.time()
        for chunk in rows:
            chunks.append(chunk)
            n += len(chunk)
            if n >= next_log:
                rate = n / max(time.time() - t0, 1e-6)
                log(f"activations {min(n, max_rows)}/{max_rows} tokens ({rate:.0f} tokens/s)")
                next_log += max_rows // 10
            if n >= max_rows:
                break
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One temporary name per process: runs sharing a cache may build it at the same time.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            save_file({"acts": torch.cat(chunks)[:max_rows].contiguous()}, str(tmp))
            tmp.replace(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a pid-named temp: no later build would replace it
            raise

    def load(self) -> Tensor:
        return load_file(str(self.path))["acts"]

    @staticmethod
    def epochs(acts: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
        """Endless batches over the cached rows, reshuffled every epoch."""
        gen = torch.Generator().manual_seed(seed)
        epoch_len = len(acts) // batch_size
        if epoch_len == 0:
            raise ValueError(f"only {len(acts)} cached activations for a batch of {batch_size}")
        while True:
            perm = torch.randperm(len(acts), generator=gen)
            for i in range(epoch_len):
                yield acts[perm[i * batch_size : (i + 1) * batch_size]]
