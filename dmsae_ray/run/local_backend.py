"""Every stage in this process, no Ray: for debugging, unit tests and tiny runs.

The Ray backend (``ray_backend.py``) runs the same algorithm functions on a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import islice

import torch
from torch import Tensor

from dmsae_ray.algo.attribution import attribute
from dmsae_ray.algo.core import Core, build_sae
from dmsae_ray.algo.evaluate import evaluate_sae
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.algo.trainer import estimate_norm_factor, repeat_batches, train_cycle
from dmsae_ray.config import RunConfig
from dmsae_ray.model.data import load_token_data
from dmsae_ray.model.lm import load_lm, load_tokenizer
from dmsae_ray.run.activation_cache import ActivationCache, write_rows
from dmsae_ray.run.buffer import (
    CachedActivations,
    iter_activations,
    iter_activations_at,
    shuffled_batches,
)
from dmsae_ray.run.rundir import RunDir, RunState


class LocalBackend:
    def __init__(self, cfg: RunConfig, rd: RunDir, log: Callable[[str], None]) -> None:
        self.cfg, self.rd, self.log = cfg, rd, log
        self.model = load_lm(cfg.model)
        self.data = load_token_data(cfg.data, load_tokenizer(cfg.model))
        self.d_in = int(self.model.config.hidden_size)
        self.state: RunState | None = None

    def open_state(self) -> RunState:
        self.state = RunState(self.rd)
        return self.state

    def _rows(self) -> Iterator[Tensor]:
        cfg = self.cfg
        return iter_activations(
            self.model,
            self.data.train_blocks(),
            cfg.model.layer,
            self.data.specials,
            cfg.data.llm_batch_size,
        )

    def _rows_at(self, blocks: Iterator[Tensor], first_block: int
                 ) -> Iterator[tuple[Tensor, Tensor]]:
        """Rows with their stream positions; ``blocks``: the stream from ``first_block`` on."""
        cfg = self.cfg
        return iter_activations_at(
            self.model, blocks, cfg.model.layer, self.data.specials, cfg.data.llm_batch_size,
            first_block,
        )

    def _cached(self, cycle: int) -> Tensor:
        """The first ``train.tokens_per_cycle`` rows of the stream (raw scale), from the
        activation cache, written first if nothing is committed there."""
        cfg = self.cfg
        want = cfg.train.tokens_per_cycle
        cache = ActivationCache.of(cfg, self.rd.root)

        def write(where: str) -> int:
            self.state.set_stage("activations", cycle=cycle)
            blocks = _Counted(self.data.train_blocks())
            rows = _logged(_first(self._rows_at(blocks, 0), want), want, self.log)
            write_rows(cache.fs, where, rows, cache.retry)
            return blocks.n  # the LM batches run: the cache's extent, past the key's blocks

        attempt = cache.open(write, self.log)
        x, _ = cache.read(attempt)
        if len(x) < want:
            # Written by the Ray backend (the key's blocks, short of the dropped separators) or
            # by a run with a smaller budget of the same block count: the rest of the stream.
            first = cache.key["blocks"] if attempt.blocks is None else attempt.blocks
            rows = self._rows_at(islice(self.data.train_blocks(), first, None), first)
            more = [r for r, _ in _first(rows, want - len(x))]
            if more:
                self.log(f"the cache holds {len(x)} of {want} rows: "
                         f"{sum(len(r) for r in more)} more computed from block {first} on")
                x = torch.cat([x, *more])
        return x[:want]

    def _batches(self, cycle: int, norm_factor: float) -> Iterator[Tensor]:
        cfg = self.cfg
        seed = cfg.train.seed + cycle
        if cfg.data.cache_activations:
            acts = self._cached(cycle)
            return CachedActivations.epochs(acts / norm_factor, cfg.train.batch_size, seed)
        buffer_rows = max(32 * cfg.train.batch_size, 4 * cfg.data.context_length)
        batches = repeat_batches(
            lambda: shuffled_batches(self._rows(), cfg.train.batch_size, buffer_rows, seed)
        )
        return (b / norm_factor for b in batches)

    def norm_factor(self) -> float:
        bs = self.cfg.train.batch_size
        rows = shuffled_batches(self._rows(), bs, bs, 0)
        return estimate_norm_factor(rows, self.cfg.sae.norm_batches)

    def train(
        self, cycle: int, core: Core | None, norm_factor: float
    ) -> tuple[MatryoshkaBatchTopKSAE, dict]:
        sae = build_sae(self.cfg, self.d_in, cycle, core)
        batches = self._batches(cycle, norm_factor)
        self.state.set_stage("train", cycle=cycle, tokens_total=self.cfg.train.tokens_per_cycle)
        metrics = train_cycle(
            sae,
            batches,
            self.cfg.sae,
            self.cfg.train,
            self.log,
            f"[cycle {cycle}] ",
            progress=lambda tokens: self.state.set_progress(tokens_done=tokens),
        )
        return sae.eval(), metrics

    def evaluate(self, sae: MatryoshkaBatchTopKSAE, norm_factor: float) -> dict:
        cfg = self.cfg
        return evaluate_sae(
            self.model,
            sae,
            self.data.eval,
            cfg.model.layer,
            norm_factor,
            self.data.specials,
            cfg.data.llm_batch_size,
        )

    def attribute(self, sae: MatryoshkaBatchTopKSAE, norm_factor: float) -> Tensor:
        cfg = self.cfg
        return attribute(
            self.model,
            sae,
            self.data.attribution,
            cfg.model.layer,
            norm_factor,
            self.data.specials,
            cfg.attribution,
            log=None,
        )

    def close(self) -> None:
        pass


def _first(rows: Iterator[tuple[Tensor, Tensor]], n: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Whole LM batches of ``rows`` until they hold ``n`` rows (or the stream ends)."""
    have = 0
    for x, pos in rows:
        yield x, pos
        have += len(x)
        if have >= n:
            return


def _logged(
    rows: Iterator[tuple[Tensor, Tensor]], total: int, log: Callable[[str], None]
) -> Iterator[tuple[Tensor, Tensor]]:
    """``rows``, with a progress line every tenth of ``total``."""
    n, next_log, t0 = 0, 0, time.time()
    for x, pos in rows:
        n += len(x)
        if n >= next_log:
            rate = n / max(time.time() - t0, 1e-6)
            log(f"activations {min(n, total)}/{total} tokens ({rate:.0f} tokens/s)")
            next_log += total // 10
        yield x, pos


class _Counted(Iterator[Tensor]):
    """``blocks`` handed on one by one, counted in ``n``."""

    def __init__(self, blocks: Iterator[Tensor]) -> None:
        self.blocks, self.n = blocks, 0

    def __next__(self) -> Tensor:
        block = next(self.blocks)
        self.n += 1
        return block
