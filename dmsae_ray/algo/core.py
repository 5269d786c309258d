"""Core selection, transfer to the next cycle, and core stability (docs/algorithm.md sections 1
and 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import RunConfig

LatentId = tuple[int, int]  # (cycle of origin, index in that cycle)


def select_minimal(scores: Tensor, tau: float) -> tuple[list[int], float]:
    """Smallest set of positions whose scores reach ``tau`` of the total, best first.

    Zero scores never enter; ties are broken by the lower index so the result is deterministic
    (any tied choice has the same size, so minimality does not depend on it). Returns the
    positions and the fraction of the total they reach; all-zero scores give an empty set.
    """
    a = scores.double().clamp_min(0)
    total = float(a.sum())
    if total <= 0:
        return [], 0.0
    # Stable sort on -a keeps ascending index among equal scores.
    order = torch.sort(-a, stable=True).indices
    order = order[a[order] > 0]
    cum = torch.cumsum(a[order], 0) / total
    # A relative tolerance so tau=1 or exact fractions are not missed by rounding.
    hit = torch.nonzero(cum >= tau - 1e-12).flatten()
    n = int(hit[0]) + 1 if hit.numel() else len(order)
    return order[:n].tolist(), float(cum[n - 1])


@dataclass
class Core:
    """A core handed to the next SAE: encoder columns [d, c] in selection order, each latent's
    persistent id, and the encoder bias [c] it had when it was selected."""

    vectors: Tensor
    ids: list[LatentId]
    bias: Tensor

    def __post_init__(self) -> None:
        c = self.vectors.shape[1]
        if len(self.ids) != c or self.bias.shape != (c,):
            raise ValueError(
                f"core of {c} vectors has {len(self.ids)} ids and bias {tuple(self.bias.shape)}"
            )

    @property
    def size(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def of(cls, sae: MatryoshkaBatchTopKSAE, indices: list[int]) -> Core:
        """The chosen latents of ``sae`` (core or not), in the given order."""
        return cls(
            vectors=sae.W_enc[:, indices].detach().clone(),
            ids=[latent_id(sae, i) for i in indices],
            bias=sae.b_enc[indices].detach().clone(),
        )


@dataclass
class CoreSelection:
    indices: list[int]  # latent indices in the cycle's SAE, in selection order
    ids: list[LatentId]
    scores: list[float]  # pooled attribution of each selected latent
    fraction: float | None  # fraction of the candidates' total attribution reached (None:
    # no attribution was computed)
    candidate_scores: list[float]  # all candidates [0, c + m_0)


def select_core(
    sae: MatryoshkaBatchTopKSAE, pooled: Tensor, tau: float, mode: str, max_core: int | None
) -> CoreSelection:
    """``reselect``: choose among core and G_0; ``accumulate``: keep the core, add from G_0."""
    c = sae.c
    if mode == "reselect":
        picked, frac = select_minimal(pooled, tau)
    elif mode == "accumulate":
        rel, frac = select_minimal(pooled[c:], tau)
        picked = list(range(c)) + [c + i for i in rel]
    else:
        raise ValueError(f"unknown core mode {mode!r}")
    if max_core is not None and len(picked) > max_core:
        picked = picked[:max_core]
        # What the truncated core explains, not what the untruncated one would have.
        a = pooled.double().clamp_min(0)
        total = float(a[c:].sum() if mode == "accumulate" else a.sum())
        kept = picked if mode == "reselect" else [i for i in picked if i >= c]
        frac = float(a[kept].sum()) / total if total > 0 else 0.0
    return CoreSelection(
        indices=picked,
        ids=[latent_id(sae, i) for i in picked],
        scores=[float(pooled[i]) for i in picked],
        fraction=frac,
        candidate_scores=pooled.tolist(),
    )


def latent_id(sae: MatryoshkaBatchTopKSAE, i: int) -> LatentId:
    return int(sae.origin_cycle[i]), int(sae.origin_index[i])


def build_sae(
    cfg: RunConfig, d_in: int, cycle: int, core: Core | None = None, seed: int | None = None
) -> MatryoshkaBatchTopKSAE:
    """A fresh SAE for ``cycle``: core encoder columns copied in order and frozen, everything
    else (core decoder, every non-core latent, every bias unless ``sae.core_bias: carry``)
    re-initialised."""
    c = 0 if core is None else core.size
    torch.manual_seed(cfg.train.seed + cycle if seed is None else seed)
    sae = MatryoshkaBatchTopKSAE.from_config(cfg.sae, d_in, core_size=c, cycle=cycle)
    if core is not None and c:
        ids = torch.tensor(core.ids, dtype=torch.long).reshape(c, 2)
        sae.set_core(
            core.vectors,
            ids[:, 0],
            ids[:, 1],
            tied=cfg.sae.core_decoder_init == "tied",
            bias=core.bias if cfg.sae.core_bias == "carry" else None,
        )
    return sae


def jaccard(a: list[LatentId], b: list[LatentId]) -> float:
    sa, sb = {tuple(x) for x in a}, {tuple(x) for x in b}
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def selection_counts(history: list[list[LatentId]]) -> dict[LatentId, int]:
    """How many cycles selected each latent (by persistent id)."""
    counts: dict[LatentId, int] = {}
    for core in history:
        for lid in core:
            counts[tuple(lid)] = counts.get(tuple(lid), 0) + 1
    return counts
