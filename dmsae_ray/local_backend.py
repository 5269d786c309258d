"""Every stage in this process, no Ray: for debugging, unit tests and tiny runs.

The Ray backend (``ray_backend.py``) runs the same algorithm functions on a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from torch import Tensor

from dmsae_ray.attribution import attribute
from dmsae_ray.buffer import (
    CachedActivations,
    cache_digest,
    iter_activations,
    shuffled_batches,
)
from dmsae_ray.config import RunConfig
from dmsae_ray.core import Core, build_sae
from dmsae_ray.data import load_token_data
from dmsae_ray.evaluate import evaluate_sae
from dmsae_ray.lm import load_lm, load_tokenizer
from dmsae_ray.rundir import RunDir, RunState
from dmsae_ray.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.trainer import estimate_norm_factor, repeat_batches, train_cycle


def local_cache_path(cfg: RunConfig, default: Path) -> Path:
    """Where this process keeps its activation cache: ``default`` (in the run directory), or,
    with ``data.activation_cache`` set (a local directory: config validation refuses object
    stores without Ray), the subdirectory both backends name by ``cache_digest``, so the runs
    of a study or sweep that share a model, layer, corpus and token budget compute it once."""
    where = cfg.data.activation_cache
    if where is None:
        return default
    base = Path(where.removeprefix("file://")).expanduser()
    return base / f"local-{cache_digest(cfg)}" / "activations.safetensors"


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

    def _batches(self, cycle: int, norm_factor: float) -> Iterator[Tensor]:
        cfg = self.cfg
        seed = cfg.train.seed + cycle
        if cfg.data.cache_activations:
            cache = CachedActivations(local_cache_path(cfg, self.rd.activations_path))
            if cache.exists():
                self.log(f"reusing cached activations at {cache.path}")
            else:
                self.state.set_stage("activations", cycle=cycle)
                cache.build(self._rows(), cfg.train.tokens_per_cycle, self.log)
            return CachedActivations.epochs(cache.load() / norm_factor, cfg.train.batch_size, seed)
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
