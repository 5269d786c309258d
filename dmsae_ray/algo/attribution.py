"""Gradient x activation of the most nested latents on next-token loss (docs/algorithm.md
section 4).

At valid positions the hooked layer's output is replaced by the most nested reconstruction
(core + first Matryoshka group), ``splice`` mode, or by that reconstruction plus a stop-gradient
error term, ``error_term`` mode (the forward then equals the clean model). The loss is the summed
next-token cross-entropy over valid targets; one forward and one backward per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import AttributionConfig
from dmsae_ray.model.data import valid_mask
from dmsae_ray.model.lm import replace_layer_output


def spliced_loss(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    ids: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    mode: str = "splice",
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (summed loss, candidate activations f [B, T, n] that require grad, valid mask)."""
    n = sae.nested_width
    valid = valid_mask(ids, specials)
    box: dict[str, Tensor] = {}

    def splice(h: Tensor) -> Tensor:
        x = h.float() / norm_factor  # the scale the SAE was trained in
        with torch.no_grad():
            f_all = sae.encode(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        f = f_all[..., :n].detach().requires_grad_(True)
        x0 = f @ sae.W_dec[:n].detach() + sae.b_dec.detach()
        if mode == "error_term":
            x0 = x0 + (x - x0).detach()
        box["f"] = f
        return torch.where(valid[..., None], x0 * norm_factor, h.float()).to(h.dtype)

    with replace_layer_output(model, layer, splice):
        logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )
    loss = (nll * valid[:, 1:].flatten()).sum()
    return loss, box["f"], valid


def attribution_scores(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    ids: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    mode: str = "splice",
) -> Tensor:
    """Signed per-token scores s = f * dL/df for the candidates [N_scored, n].

    dL/df_i = g . W_dec[i], and decoder rows are unit norm, so this is the gradient projected on
    the decoder direction times the activation. Only positions that have a next-token target
    are scored (``scored_mask``): the last position of a block feeds no loss term, so its
    scores are 0 by construction and would only dilute the quantile.
    """
    loss, f, valid = spliced_loss(model, sae, ids, layer, norm_factor, specials, mode)
    (grad,) = torch.autograd.grad(loss, f)
    return (f.detach() * grad)[scored_mask(valid)]


def scored_mask(valid: Tensor) -> Tensor:
    """Positions pooled into the attribution: valid (not BOS/EOS/pad) and followed by a valid
    next-token target, i.e. every position whose own loss term enters the summed loss."""
    scored = torch.zeros_like(valid)
    scored[:, :-1] = valid[:, :-1] & valid[:, 1:]
    return scored


def signed_to_pooled_input(s: Tensor, sign: str) -> Tensor:
    if sign == "abs":
        return s.abs()
    if sign == "helpful_only":
        # Removing the latent raises the loss exactly when the effect -s is positive.
        return torch.relu(-s)
    raise ValueError(f"unknown attribution sign {sign!r}")


def column_quantile(values: Tensor, q: float) -> Tensor:
    """Exact per-column quantile with linear interpolation (torch.quantile caps its input size)."""
    n = values.shape[0]
    srt = values.float().sort(dim=0).values
    pos = q * (n - 1)
    lo, hi = int(pos), min(int(pos) + 1, n - 1)
    return srt[lo] + (srt[hi] - srt[lo]) * (pos - lo)


def pool(values: Tensor, cfg: AttributionConfig) -> Tensor:
    if cfg.pooling == "quantile":
        return column_quantile(values, cfg.quantile)
    # Each column reduced as one contiguous row: its mean is then the same bits whatever other
    # columns share the tensor (``mean(0)`` vectorises across the width, so a Ray reducer's
    # chunk of columns differed from the in-process result in the last bit).
    return values.float().t().contiguous().mean(1)


def token_scores(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    blocks: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    cfg: AttributionConfig,
    log: Callable[[str], None] | None = None,
) -> Tensor:
    """Per-token pooling inputs [N_scored, n] over ``blocks``, fp32 on the CPU, rows in block
    order: what ``pool`` reduces. The one loop over the attribution blocks, shared by the
    in-process ``attribute`` and the Ray ``ScoringActor``.

    fp32 because in the normalised scale the scores can underflow fp16; on the CPU because the
    rows of every batch (and, on Ray, of every actor) are joined before the exact quantile.
    """
    device = next(model.parameters()).device
    parts = []
    for start in range(0, blocks.shape[0], cfg.batch_size):
        ids = blocks[start : start + cfg.batch_size].to(device)
        s = attribution_scores(model, sae, ids, layer, norm_factor, specials, cfg.mode)
        parts.append(signed_to_pooled_input(s, cfg.sign).to("cpu", torch.float32))
        if log:
            log(f"attribution {min(start + cfg.batch_size, len(blocks))}/{len(blocks)} sequences")
    return torch.cat(parts)


def attribute(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    blocks: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    cfg: AttributionConfig,
    log: Callable[[str], None] | None = print,
) -> Tensor:
    """Pooled attribution A_i >= 0 for every candidate latent [0, c + m_0) over ``blocks``.

    Every per-token score is kept so the quantile is exact; at |candidates| ~ 2k and 2^18
    tokens that is ~2 GB, which the Ray path splits across actors by latent.
    """
    return pool(token_scores(model, sae, blocks, layer, norm_factor, specials, cfg, log), cfg)
