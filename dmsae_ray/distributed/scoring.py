"""Attribution and evaluation on Ray: an actor pool holding the full LM and the cycle's SAE.

Each actor scores its share of the held-out blocks and returns its per-token scores split by
latent chunk; one reducer task per chunk then pools (exact quantile) over every token. No
process ever holds all tokens x all candidates.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from torch import Tensor

from dmsae_ray.algo.attribution import pool, token_scores
from dmsae_ray.algo.evaluate import evaluate_sae
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import AttributionConfig, ModelConfig, RunConfig
from dmsae_ray.model.lm import load_lm


@ray.remote
class ScoringActor:
    def __init__(self, model: dict, layer: int, specials: list[int]) -> None:
        self.model = load_lm(ModelConfig.model_validate(model))
        self.device = next(self.model.parameters()).device
        self.layer, self.specials = layer, specials
        self.sae: MatryoshkaBatchTopKSAE | None = None

    def load_sae(self, hparams: dict, state: dict[str, Tensor]) -> None:
        self.sae = MatryoshkaBatchTopKSAE.from_state(hparams, state).to(self.device).eval()

    def attribute(
        self, blocks: np.ndarray, cfg: dict, norm_factor: float, chunks: list[tuple[int, int]]
    ) -> list[np.ndarray] | np.ndarray:
        # Ray hands arrays over read-only, and torch.from_numpy wants a writable one.
        ids = torch.from_numpy(blocks.copy())
        scores = token_scores(
            self.model, self.sae, ids, self.layer, norm_factor, self.specials,
            AttributionConfig.model_validate(cfg),
        ).numpy()
        out = [np.ascontiguousarray(scores[:, a:b]) for a, b in chunks]
        # num_returns=1 makes the return value itself the one object, not a list of one.
        return out if len(out) > 1 else out[0]

    def evaluate(self, blocks: np.ndarray, norm_factor: float, batch_size: int) -> dict:
        return evaluate_sae(
            self.model, self.sae, torch.from_numpy(blocks.copy()), self.layer, norm_factor,
            self.specials, batch_size,
        )


@ray.remote
def pool_chunk(cfg: dict, *parts: np.ndarray) -> np.ndarray:
    values = torch.from_numpy(np.concatenate(parts))
    return pool(values, AttributionConfig.model_validate(cfg)).numpy()


def latent_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


class ScoringPool:
    """Actors for one cycle: created after training (they hold the LM and GPUs), then killed."""

    def __init__(self, cfg: RunConfig, specials: list[int], sae: MatryoshkaBatchTopKSAE) -> None:
        self.cfg = cfg
        resources = {"num_gpus": 1} if cfg.ray.use_gpu else {"num_cpus": 1}
        self.actors = [
            ScoringActor.options(**resources).remote(
                cfg.model.model_dump(), cfg.model.layer, specials
            )
            for _ in range(cfg.ray.activation_actors)
        ]
        state = ray.put({k: v.detach().cpu() for k, v in sae.state_dict().items()})
        ray.get([a.load_sae.remote(sae.hparams(), state) for a in self.actors])
        self.n_candidates = sae.nested_width

    def attribute(self, blocks: Tensor, norm_factor: float, chunk: int = 512) -> Tensor:
        chunks = latent_chunks(self.n_candidates, chunk)
        acfg = self.cfg.attribution.model_dump()
        shards = np.array_split(blocks.numpy(), len(self.actors))
        per_actor = [
            a.attribute.options(num_returns=len(chunks)).remote(s, acfg, norm_factor, chunks)
            for a, s in zip(self.actors, shards, strict=True)
            if len(s)
        ]
        if len(chunks) == 1:
            per_actor = [[refs] for refs in per_actor]
        pooled = [pool_chunk.remote(acfg, *(refs[j] for refs in per_actor))
                  for j in range(len(chunks))]
        return torch.from_numpy(np.concatenate(ray.get(pooled)))

    def evaluate(self, blocks: Tensor, norm_factor: float) -> dict:
        # The eval set is small: one actor holds it, so metrics need no cross-actor merge.
        bs = self.cfg.data.llm_batch_size
        return ray.get(self.actors[0].evaluate.remote(blocks.numpy(), norm_factor, bs))

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []  # closing twice is harmless
