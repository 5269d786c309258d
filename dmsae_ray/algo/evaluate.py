"""SAEBench core metrics on held-out tokens, with the inference threshold (SAEBench 0.6,
``sae_bench/evals/core/main.py``).

Every metric is taken on raw-scale activations, as SAEBench sees an exported SAE (the norm factor
folded into its biases): ``x``, ``x_hat`` and the codes are multiplied back by the norm factor.
Where SAEBench's code has a quirk, the SAEBench name carries SAEBench's value and the sane
quantity gets a name of its own:

- ``explained_variance``: SAEBench's. Per eval batch it keeps the mean of ||x||^2, the mean of
  x_d^2 per dimension, and the mean residual sum of squares; at the end
  ``1 - mean(rss) / (mean ||x||^2 - (mean over batches and dims of x_d^2)^2)``. The subtracted
  term is a squared mean *square*, not ||E x||^2, so the number depends on the activation scale.
- ``fve``: ours, the fraction of variance explained, 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)
  over all eval tokens. Scale-free; the headline reconstruction metric of our tables.
- ``explained_variance_legacy``: SAEBench's older per-token 1 - rss / ||x - batch mean||^2.
- ``relative_reconstruction_bias``: E||x_hat||^2 / E<x, x_hat> per eval batch, averaged over
  batches (SAEBench). ``l0``, ``l1``, ``cossim``, ``l2_*``: per-token means over all tokens.
- ``mse`` = E_tokens sum_d (x - x_hat)^2, raw scale (SAEBench divides each token by its batch's
  token count instead, which makes its number depend on the batch size).
- ``average_max_encoder_cosine_sim`` / ``average_max_decoder_cosine_sim``: each latent's largest
  cosine similarity with any other latent's encoder column / decoder row, averaged.
- CE and KL: at BOS/EOS/pad the clean activation is kept for the SAE splice
  (``exclude_special_tokens_from_reconstruction``); zero-ablation zeroes every position, as
  SAEBench does; the per-token values are averaged over positions whose *input* token is not
  special (SAEBench's ``ignore_tokens``).
- ``l0_overflow``: how far the core alone fires past k per token (``core_activation: relu``
  only; 0 otherwise): the part of the total L0 the budget could not absorb.

The eval set is the run's own held-out blocks (``data.eval_sequences`` sequences of
``data.context_length`` tokens, from the training corpus), not SAEBench's protocol (openwebtext,
context 128, 200 reconstruction batches of 16 prompts): numbers compare across our runs, and
only roughly with SAEBench's tables.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.model.data import valid_mask
from dmsae_ray.model.lm import replace_layer_output

# Upper bound on token positions per LM forward during evaluation: the clean logits are kept while
# the spliced and ablated forwards run, and at Gemma's 256k vocabulary every position costs 0.5 MB.
LOGIT_TOKENS = 8_192
# Elements of a float32 logit slice turned into log-probabilities at once (bounds the temporaries).
_LOGIT_CHUNK = 1 << 25
DENSITY_EPS = 1e-10  # SAELens' log-sparsity offset: log10(density + 1e-10)
HIST_EDGES = [x / 2 for x in range(-20, 1)]  # log10 density bins from -10 (dead) to 0


class CoreStats:
    """Running sums over eval tokens, so no [tokens x latents] matrix is ever kept.

    ``scale`` turns the SAE's normalised inputs, reconstructions and codes into raw units.
    """

    def __init__(self, width: int, core: int, scale: float = 1.0) -> None:
        self.width, self.core, self.scale = width, core, scale
        self.n = 0
        self.sums: dict[str, float] = {}
        self.fired = torch.zeros(width, dtype=torch.float64)
        self.sum_x: Tensor | None = None  # [d]
        # SAEBench's per-batch terms (explained_variance, relative_reconstruction_bias).
        self.batches: dict[str, list] = {"x2": [], "x2_per_dim": [], "rss": [], "rrb": []}

    def _add(self, key: str, value: Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    @torch.no_grad()
    def update(
        self, x: Tensor, x_hat: Tensor, f: Tensor, x_hat_nested: Tensor | None = None
    ) -> None:
        """One eval batch of valid tokens: inputs, full reconstructions, codes [n, K]."""
        if x.shape[0] == 0:
            return
        s = self.scale
        x, x_hat, f = x.double() * s, x_hat.double() * s, f.double() * s
        active = f != 0
        rss = (x - x_hat).pow(2).sum(-1)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        # SAEBench: a (near-)zero input norm divides by 1 instead.
        denom = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
        batch_var = (x - x.mean(0, keepdim=True)).pow(2).sum(-1)
        x2 = x.pow(2).sum(-1)
        self._add("l0", active.sum())
        self._add("core_l0", active[:, : self.core].sum())
        self._add("l1", f.sum())
        self._add("rss", rss.sum())
        self._add("x_norm2", x2.sum())
        self._add("cossim", F.cosine_similarity(x, x_hat, dim=-1).sum())
        self._add("l2_norm_in", norm_in.sum())
        self._add("l2_norm_out", norm_out.sum())
        self._add("l2_ratio", (norm_out / denom).sum())
        self._add("ev_legacy", (1 - rss / batch_var).sum())
        if x_hat_nested is not None:
            self._add("nested_rss", (x - x_hat_nested.double() * s).pow(2).sum())
        self.batches["x2"].append(float(x2.mean()))
        self.batches["x2_per_dim"].append(x.pow(2).mean(0).cpu())
        self.batches["rss"].append(float(rss.mean()))
        self.batches["rrb"].append(float(norm_out.pow(2).mean() / (x * x_hat).sum(-1).mean()))
        sx = x.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.fired += active.sum(0).cpu().double()
        self.n += x.shape[0]

    def density(self) -> Tensor:
        """Fraction of eval tokens on which each latent fires [K]."""
        return (self.fired / max(self.n, 1)).float()

    def metrics(self) -> dict:
        n = max(self.n, 1)
        s = {k: v / n for k, v in self.sums.items()}
        mean_x = self.sum_x / n if self.sum_x is not None else torch.zeros(1)
        total_var = s.get("x_norm2", 0.0) - float(mean_x.pow(2).sum())
        mse = s.get("rss", 0.0)
        out = {
            "l0": s.get("l0", 0.0),
            "core_l0": s.get("core_l0", 0.0),
            "l1": s.get("l1", 0.0),
            "mse": mse,
            "fve": _one_minus_ratio(mse, total_var),
            "explained_variance": self._saebench_explained_variance(),
            "explained_variance_legacy": s.get("ev_legacy", math.nan),
            "cossim": s.get("cossim", math.nan),
            "l2_norm_in": s.get("l2_norm_in", math.nan),
            "l2_norm_out": s.get("l2_norm_out", math.nan),
            "l2_ratio": s.get("l2_ratio", math.nan),
            "relative_reconstruction_bias": _mean(self.batches["rrb"]),
        }
        if "nested_rss" in s:
            out["nested_mse"] = s["nested_rss"]
            out["nested_fve"] = _one_minus_ratio(s["nested_rss"], total_var)
        return out | density_metrics(self.density(), self.core)

    def _saebench_explained_variance(self) -> float:
        b = self.batches
        if not b["x2"]:
            return math.nan
        mean_sq = _mean(b["x2"])
        mean_sq_per_dim = float(torch.cat(b["x2_per_dim"]).mean())
        total = mean_sq - mean_sq_per_dim**2
        # Kept even when that "variance" is negative (large activations): it is SAEBench's.
        return math.nan if total == 0 else 1 - _mean(b["rss"]) / total


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def max_cosine_sims(vectors: Tensor, chunk: int = 1024) -> Tensor:
    """Each column's largest cosine similarity with any *other* column of ``vectors`` [d, F]
    (SAEBench's ``calculate_max_cosine_sim``), in chunks so no F x F matrix is ever held."""
    unit = F.normalize(vectors.detach().float(), dim=0)
    n = unit.shape[1]
    out = torch.empty(n)
    for start in range(0, n, chunk):
        sims = unit[:, start : start + chunk].T @ unit
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -math.inf
        out[start : start + chunk] = sims.max(dim=1).values.cpu()
    return out


def weight_metrics(sae: MatryoshkaBatchTopKSAE) -> dict:
    """SAEBench's weight-based misc metrics: average max encoder / decoder cosine similarity."""
    if sae.width < 2:
        return {}
    return {
        "average_max_encoder_cosine_sim": float(max_cosine_sims(sae.W_enc).mean()),
        "average_max_decoder_cosine_sim": float(max_cosine_sims(sae.W_dec.T).mean()),
    }


def _ratio(a: float | None, b: float | None) -> float:
    return math.nan if a is None or not b else a / b


def _one_minus_ratio(a: float, b: float) -> float:
    return math.nan if b <= 0 else 1 - a / b


def reconstruction_metrics(
    x: Tensor,
    x_hat: Tensor,
    f: Tensor,
    core: int,
    x_hat_nested: Tensor | None = None,
    scale: float = 1.0,
) -> dict:
    """SAEBench sparsity, reconstruction, shrinkage and density metrics of one eval batch."""
    stats = CoreStats(f.shape[1], core, scale)
    stats.update(x, x_hat, f, x_hat_nested)
    return stats.metrics()


def log_sparsity(density: Tensor) -> Tensor:
    """What SAELens stores in ``sparsity.safetensors``."""
    return torch.log10(density.float() + DENSITY_EPS)


def density_histogram(density: Tensor) -> dict[str, list]:
    """Counts of latents per log10-density bin; dead latents land in the first bin."""
    logd = log_sparsity(density).double()
    edges = torch.tensor(HIST_EDGES, dtype=torch.float64)
    idx = torch.bucketize(logd, edges, right=True).sub(1).clamp(0, len(HIST_EDGES) - 2)
    counts = torch.bincount(idx, minlength=len(HIST_EDGES) - 1)
    return {"log10_edges": HIST_EDGES, "counts": counts.tolist()}


def density_metrics(density: Tensor, core: int = 0) -> dict:
    """Feature-density summaries as SAEBench's misc metrics: alive and dense latents."""
    d = density.double()
    total = float(d.sum())
    out = {
        "frac_alive": float((d > 0).double().mean()),
        "freq_over_1_percent": float((d > 0.01).double().mean()),
        "freq_over_10_percent": float((d > 0.1).double().mean()),
        # Share of all firings that go to the dense latents.
        "normalized_freq_over_1_percent": float(d[d > 0.01].sum()) / total if total else 0.0,
        "normalized_freq_over_10_percent": float(d[d > 0.1].sum()) / total if total else 0.0,
        "feature_density_hist": density_histogram(density),
    }
    if core:
        out["core_frac_alive"] = float((d[:core] > 0).double().mean())
    return out


def l0_overflow(sae: MatryoshkaBatchTopKSAE, core_l0: float) -> float:
    """Core firings per token beyond k: what a ``relu`` core adds on top of the budget."""
    return 0.0 if sae.core_in_topk else max(0.0, float(core_l0) - sae.k)


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """Fraction of the loss gap between zero-ablation and the clean model that the SAE closes."""
    gap = ce_zero - ce_clean
    return float("nan") if gap == 0 else (ce_zero - ce_sae) / gap


def kl_div_score(kl_sae: float, kl_zero: float) -> float:
    """(KL_zero - KL_sae) / KL_zero, each the mean per-token KL(p_clean || p_new)."""
    return float("nan") if kl_zero == 0 else (kl_zero - kl_sae) / kl_zero


def token_ce_kl(
    clean_logits: Tensor, new_logits: Tensor, ids: Tensor, kl: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Per-position next-token CE of the new logits [B, T-1] and KL(p_clean || p_new) [B, T].

    Log-probabilities are taken over position chunks so only a slice is ever held in float32.
    """
    b, t, v = new_logits.shape
    step = max(1, _LOGIT_CHUNK // max(b * v, 1))
    ces, kls = [], []
    for s in range(0, t, step):
        lp_new = F.log_softmax(new_logits[:, s : s + step].float(), -1)
        tgt = ids[:, s + 1 : s + step + 1]  # the last position has no next token
        ces.append(-lp_new[:, : tgt.shape[1]].gather(-1, tgt[..., None]).squeeze(-1))
        if kl:
            lp_clean = F.log_softmax(clean_logits[:, s : s + step].float(), -1)
            kls.append(F.kl_div(lp_new, lp_clean, log_target=True, reduction="none").sum(-1))
    return torch.cat(ces, 1), (torch.cat(kls, 1) if kl else None)


@torch.no_grad()
def run_eval(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    blocks: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    batch_size: int = 8,
    logit_tokens: int = LOGIT_TOKENS,
) -> tuple[dict, Tensor]:
    """The metrics and the per-latent firing density [K] on ``blocks`` [N, T]."""
    device = next(model.parameters()).device
    sae_device = next(sae.parameters()).device
    rows = max(1, min(batch_size, logit_tokens // max(blocks.shape[1], 1)))
    stats = CoreStats(sae.width, sae.c, norm_factor)
    lm = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_ce = n_kl = 0
    box: dict[str, Tensor] = {}

    def capture(out: Tensor) -> Tensor:
        box["h"] = out.clone()  # later layers must not be able to alter it
        return out

    for start in range(0, blocks.shape[0], rows):
        ids = blocks[start : start + rows].to(device)
        valid = valid_mask(ids, specials)
        with replace_layer_output(model, layer, capture):
            clean = model(input_ids=ids, use_cache=False).logits
        h = box["h"]
        x = h[valid].float().to(sae_device) / norm_factor
        f = sae.encode(x)  # inference: core ReLU, non-core JumpReLU at the learned threshold
        x_hat = sae.decode(f)
        stats.update(x, x_hat, f, sae.decode_nested(f, sae.nested_width))
        recon = h.clone()
        recon[valid] = (x_hat * norm_factor).to(h.device, h.dtype)
        ce_mask, kl_mask = valid[:, :-1], valid
        ce_clean, _ = token_ce_kl(clean, clean, ids, kl=False)
        lm["ce_clean"] += float(ce_clean[ce_mask].sum())
        # The layers below L are untouched, so the splice can reuse this forward's activation.
        for key, new in (("sae", recon), ("zero", torch.zeros_like(h))):
            with replace_layer_output(model, layer, lambda _out, new=new: new):
                logits = model(input_ids=ids, use_cache=False).logits
            ce, kl = token_ce_kl(clean, logits, ids)
            lm[f"ce_{key}"] += float(ce[ce_mask].sum())
            lm[f"kl_{key}"] += float(kl[kl_mask].sum())
            del logits
        n_ce += int(ce_mask.sum())
        n_kl += int(kl_mask.sum())
        del clean
    lm = {k: v / max(n_ce if k.startswith("ce") else n_kl, 1) for k, v in lm.items()}
    out = stats.metrics() | lm | weight_metrics(sae)
    out |= {
        "l0_overflow": l0_overflow(sae, out["core_l0"]),
        "ce_loss_score": ce_loss_score(lm["ce_clean"], lm["ce_sae"], lm["ce_zero"]),
        "kl_div_score": kl_div_score(lm["kl_sae"], lm["kl_zero"]),
        "eval_tokens": stats.n,
        "norm_factor": float(norm_factor),
    }
    return out, stats.density()


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    blocks: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    batch_size: int = 8,
) -> dict:
    """SAEBench core metrics of ``sae`` on ``blocks`` (JSON-ready: scalars and one histogram),
    plus ``candidate_density``: the firing density of each attribution candidate (the latents
    of the most nested reconstruction), which the cycle keeps for the latents it selects."""
    metrics, density = run_eval(model, sae, blocks, layer, norm_factor, specials, batch_size)
    return metrics | {"candidate_density": density[: sae.nested_width].tolist()}
