"""Token blocks -> LM (stopped after layer L) -> shuffled, normalisable activation batches.

Plain PyTorch: the in-process path iterates it directly and the Ray Data actors call
``block_activations_at`` on their share of the blocks. The activation cache of both backends
is ``activation_cache.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from dmsae_ray.config import RunConfig
from dmsae_ray.model.data import valid_mask
from dmsae_ray.model.lm import layer_activations


def blocks_needed(cfg: RunConfig) -> int:
    return math.ceil(cfg.train.tokens_per_cycle / (cfg.data.context_length - 1))


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
    for x, _ in iter_activations_at(model, blocks, layer, specials, llm_batch_size):
        yield x


def iter_activations_at(
    model: nn.Module,
    blocks: Iterable[Tensor],
    layer: int,
    specials: list[int],
    llm_batch_size: int,
    first_block: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Activation rows and their stream positions, ``llm_batch_size`` blocks per LM batch;
    ``blocks`` is the training stream from block ``first_block`` on."""
    batch: list[Tensor] = []
    index = first_block

    def run() -> tuple[Tensor, Tensor]:
        numbers = torch.arange(index, index + len(batch), dtype=torch.int64)
        x, pos = block_activations_at(model, torch.stack(batch), numbers, layer, specials)
        assert pos is not None
        return x, pos

    for block in blocks:
        batch.append(block)
        if len(batch) == llm_batch_size:
            yield run()
            index += len(batch)
            batch = []
    if batch:
        yield run()


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
    """Activation rows held in memory, replayed as seeded epochs: the in-process cache's rows,
    or a Ray training worker's share when it fits ``train.epoch_cache_mb``."""

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
