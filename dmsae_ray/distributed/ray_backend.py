"""The stages of a cycle on Ray: Ray Data activations, Ray Train SAE training, a scoring actor
pool for evaluation and attribution, and the coordinator actor owning the run's state."""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
from torch import Tensor

from dmsae_ray.algo.core import Core
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.algo.trainer import estimate_norm_factor
from dmsae_ray.config import RunConfig
from dmsae_ray.distributed.activations import (
    activation_dataset,
    cached_dataset,
    has_block_index,
    write_token_blocks,
)
from dmsae_ray.distributed.coordinator import CoordinatorState, coordinator_name, get_coordinator
from dmsae_ray.distributed.ray_utils import check_resources, connect
from dmsae_ray.distributed.scoring import ScoringPool
from dmsae_ray.distributed.training import train_sae
from dmsae_ray.model.data import load_token_data
from dmsae_ray.model.lm import hidden_size_of, load_tokenizer
from dmsae_ray.run.activation_cache import ActivationCache
from dmsae_ray.run.buffer import blocks_needed
from dmsae_ray.run.rundir import RunDir


class RayBackend:
    def __init__(self, cfg: RunConfig, rd: RunDir, log: Callable[[str], None]) -> None:
        self.cfg, self.rd, self.log = cfg, rd, log
        connect(cfg.ray)
        check_resources(cfg.ray)
        ctx = ray.data.DataContext.get_current()
        # No preserve_order: it costs throughput and Ray Data does not keep rows in order even
        # with it; reproducibility comes from each row's token position (README).
        # Bars redrawn into a log file (ray job logs, CI) are thousands of lines of noise.
        ctx.enable_progress_bars = sys.stdout.isatty()
        # One line per Dataset run ("execution finished in ..."), not its id, log path and
        # plan up front as well.
        ctx.print_on_execution_start = False
        # The driver needs only the tokenizer and the held-out blocks; the LM lives in actors.
        self.data = load_token_data(cfg.data, load_tokenizer(cfg.model))
        self.d_in = hidden_size_of(cfg.model)
        self.coordinator = None
        self.state: CoordinatorState | None = None
        self._pool: tuple[int, ScoringPool] | None = None

    def open_state(self) -> CoordinatorState:
        self.coordinator = get_coordinator(self.rd.root)
        self.state = CoordinatorState(self.coordinator)
        return self.state

    def _tokens(self) -> Path:
        tokens = self.rd.root / "tokens"
        if tokens.is_dir() and not has_block_index(tokens):
            # Written before blocks carried their index; the same tokens come out again.
            self.log(f"rewriting {tokens} with block indices")
            shutil.rmtree(tokens)
        if not tokens.is_dir():
            self.state.set_stage("tokenize")
            write_token_blocks(self.data.train_blocks(), tokens, blocks_needed(self.cfg), self.log)
        return tokens

    def _dataset(self) -> ray.data.Dataset:
        ds = activation_dataset(self.cfg, self._tokens(), self.data.specials)
        if self.cfg.data.cache_activations:
            self.state.set_stage("activations")
            cache = ActivationCache.of(self.cfg, self.rd.root)
            ds = cached_dataset(ds, cache.fs, cache.path, cache.key, self.log, cache.retry)
        return ds

    def norm_factor(self) -> float:
        """From the activations of the first token blocks (about ``sae.norm_batches`` training
        batches): a fixed set of rows, whatever order Ray Data delivers them in."""
        cfg = self.cfg
        rows = cfg.sae.norm_batches * cfg.train.batch_size
        first = math.ceil(rows / (cfg.data.context_length - 1))
        if cfg.data.cache_activations:
            # The cache holds these rows (every token block's): read them back instead of
            # starting a pool of LM actors for them. The same rows give the same bits (an exact
            # sum), and the cache is written once either way.
            ds = self._dataset().map_batches(
                _first_positions(first * cfg.data.context_length), batch_format="numpy"
            )
        else:
            ds = activation_dataset(cfg, self._tokens(), self.data.specials, first_blocks=first)
        batches = ds.iter_torch_batches(batch_size=cfg.train.batch_size, dtypes=torch.float32)
        return estimate_norm_factor(b["x"] for b in batches)

    def train(
        self, cycle: int, core: Core | None, norm_factor: float
    ) -> tuple[MatryoshkaBatchTopKSAE, dict]:
        ds = self._dataset()
        self.state.set_stage("train", cycle=cycle, tokens_total=self.cfg.train.tokens_per_cycle)
        return train_sae(
            self.cfg, self.rd.root, cycle, core, norm_factor, self.d_in, ds,
            coordinator_name(self.rd.root),
        )

    def _scoring(self, sae: MatryoshkaBatchTopKSAE) -> ScoringPool:
        if self._pool is None or self._pool[0] != id(sae):
            self._close_pool()
            self._pool = (id(sae), ScoringPool(self.cfg, self.data.specials, sae))
        return self._pool[1]

    def evaluate(self, sae: MatryoshkaBatchTopKSAE, norm_factor: float) -> dict:
        return self._scoring(sae).evaluate(self.data.eval, norm_factor)

    def attribute(self, sae: MatryoshkaBatchTopKSAE, norm_factor: float) -> Tensor:
        pooled = self._scoring(sae).attribute(self.data.attribution, norm_factor)
        self._close_pool()  # free the actors' LMs (and GPUs) before the next cycle trains
        return pooled

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool[1].close()
            self._pool = None

    def close(self) -> None:
        self._close_pool()
        if self.coordinator is not None:
            # Its state is on disk; a resumed run starts a fresh one from there.
            ray.kill(self.coordinator)


def _first_positions(end: int) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The rows of a batch whose token-stream position is below ``end``."""

    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = batch["pos"] < end
        return {k: v[mask] for k, v in batch.items()}

    return keep
