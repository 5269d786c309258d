"""SAEBench core metrics on held-out tokens, with the inference threshold (ALGORITHM.md 12.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmsae_ray.data import valid_mask
from dmsae_ray.lm import layer_activations, replace_layer_output
from dmsae_ray.sae import MatryoshkaBatchTopKSAE


def reconstruction_metrics(x: Tensor, x_hat: Tensor, f: Tensor, core: int) -> dict[str, float]:
    """Per-token sums over d, means over tokens, as SAEBench reports them."""
    err = (x - x_hat).pow(2).sum(-1)
    total_var = (x - x.mean(0, keepdim=True)).pow(2).sum(-1)
    return {
        "l0": float((f > 0).sum(-1).float().mean()),
        "core_l0": float((f[:, :core] > 0).sum(-1).float().mean()),
        "mse": float(err.mean()),
        "explained_variance": float(1 - err.sum() / total_var.sum()),
        "cossim": float(F.cosine_similarity(x, x_hat, dim=-1).mean()),
        "l2_ratio": float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8)).mean()),
    }


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """Fraction of the loss gap between zero-ablation and the clean model that the SAE closes."""
    gap = ce_zero - ce_clean
    return float("nan") if gap == 0 else (ce_zero - ce_sae) / gap


def _mean_ce(model: nn.Module, ids: Tensor, valid: Tensor) -> tuple[float, int]:
    logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )
    mask = valid[:, 1:].flatten().float()
    return float((nll * mask).sum()), int(mask.sum())


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    blocks: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    batch_size: int = 8,
) -> dict[str, float]:
    device = next(model.parameters()).device
    xs, xh, fs = [], [], []
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_tok = 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        valid = valid_mask(ids, specials)
        h = layer_activations(model, ids, layer)[valid].float() / norm_factor
        f = sae.encode(h)
        xs.append(h.cpu())
        xh.append(sae.decode(f).cpu())
        fs.append(f.cpu())

        def patch(out: Tensor, use_sae: bool, valid: Tensor = valid) -> Tensor:
            new = torch.zeros_like(out, dtype=torch.float32)
            if use_sae:
                flat = out.float()[valid] / norm_factor
                new[valid] = sae.decode(sae.encode(flat)) * norm_factor
            # BOS/pad keep their clean activation, as SAEBench's exclude_special_tokens does.
            return torch.where(valid[..., None], new, out.float()).to(out.dtype)

        s, n = _mean_ce(model, ids, valid)
        ce["clean"] += s
        for key, use in (("sae", True), ("zero", False)):
            with replace_layer_output(model, layer, lambda o, u=use: patch(o, u)):
                ce[key] += _mean_ce(model, ids, valid)[0]
        n_tok += n
    x, x_hat, f = torch.cat(xs), torch.cat(xh), torch.cat(fs)
    out = reconstruction_metrics(x, x_hat, f, sae.c)
    ce = {k: v / max(n_tok, 1) for k, v in ce.items()}
    out |= {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_loss_score": ce_loss_score(ce["clean"], ce["sae"], ce["zero"]),
        "frac_alive": float(((f > 0).sum(0) > 0).float().mean()),
        "eval_tokens": int(x.shape[0]),
    }
    return out
