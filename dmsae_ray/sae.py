"""Matryoshka BatchTopK SAE with a frozen core block (ALGORITHM.md sections 4-6).

Latents ``[0, c)`` are the core: plain ReLU, encoder columns copied from the previous cycle and
kept as a buffer so no optimiser can ever touch them. Latents ``[c, K)`` are non-core, split
into nested Matryoshka groups and sparsified with a global BatchTopK.
The SAE works in the normalised input scale (``x / norm_factor``); callers normalise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def group_sizes(
    width: int, core: int, fractions: list[float], mode: str = "fractions"
) -> list[int]:
    """Non-core Matryoshka group sizes (ALGORITHM.md 4.1)."""
    if core >= width:
        raise ValueError(f"core size {core} must be smaller than the width {width}")
    if mode == "fractions":
        n = width - core
        sizes = [int(f * n) for f in fractions[:-1]]
        sizes.append(n - sum(sizes))
    elif mode == "absolute":
        sizes = [int(f * width) for f in fractions[:-1]]
        sizes.append(width - sum(sizes))
        eat = core  # the core takes its room from the innermost groups first
        for i in range(len(sizes)):
            take = min(eat, sizes[i] - 1 if i < len(sizes) - 1 else sizes[i])
            sizes[i] -= take
            eat -= take
        sizes = [s for s in sizes if s > 0]
    else:
        raise ValueError(f"unknown group mode {mode!r}")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"width {width} with core {core} leaves an empty group: {sizes}")
    return sizes


@dataclass
class EncodeOutput:
    f: Tensor  # [B, K] sparse codes
    post: Tensor  # [B, K] post-ReLU pre-activations (for aux-k)
    core_l0: Tensor  # scalar: active core latents per token
    min_selected: Tensor  # scalar: smallest positive selected non-core activation (or -1)


class MatryoshkaBatchTopKSAE(nn.Module):
    def __init__(
        self,
        d_in: int,
        width: int,
        k: int,
        core_size: int = 0,
        group_fractions: list[float] | None = None,
        group_mode: str = "fractions",
        l0_budget: str = "dynamic",
        bias_level: bool = False,
        cycle: int = 0,
    ) -> None:
        super().__init__()
        fractions = group_fractions or [1.0]
        self.d_in, self.width, self.k, self.c = d_in, width, k, core_size
        self.l0_budget = l0_budget
        self.bias_level = bias_level
        self.groups = group_sizes(width, core_size, fractions, group_mode)
        nc = width - core_size
        self.register_buffer("W_enc_core", torch.zeros(d_in, core_size))
        self.W_enc_nc = nn.Parameter(torch.zeros(d_in, nc))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(width, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))
        # Persistent latent ids: (cycle of origin, index in that cycle). Core rows keep theirs.
        self.register_buffer("origin_cycle", torch.full((width,), cycle, dtype=torch.long))
        self.register_buffer("origin_index", torch.arange(width, dtype=torch.long))
        self.reset_parameters()

    # -- initialisation -----------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """dictionary_learning init: kaiming decoder with unit rows, W_enc = W_dec^T."""
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self.W_enc_nc.copy_(self.W_dec[self.c :].T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def set_core(
        self, encoder_columns: Tensor, origin_cycle: Tensor, origin_index: Tensor, tied: bool
    ) -> None:
        """Copy the previous cycle's core encoder vectors (in selection order) into [0, c)."""
        if encoder_columns.shape != (self.d_in, self.c):
            raise ValueError(f"core must be [{self.d_in}, {self.c}], got {encoder_columns.shape}")
        self.W_enc_core.copy_(encoder_columns)
        self.origin_cycle[: self.c] = origin_cycle
        self.origin_index[: self.c] = origin_index
        if tied and self.c:
            cols = encoder_columns.T
            self.W_dec[: self.c] = cols / cols.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> None:
        self.b_dec.copy_(geometric_median(x))

    # -- forward ------------------------------------------------------------------------
    @property
    def W_enc(self) -> Tensor:
        return torch.cat([self.W_enc_core, self.W_enc_nc], dim=1)

    @property
    def group_ends(self) -> list[int]:
        """Absolute end index of each nested level (core included)."""
        ends, end = [], self.c
        for g in self.groups:
            end += g
            ends.append(end)
        return ends

    @property
    def nested_width(self) -> int:
        """Width of the most nested reconstruction: the core plus the first group."""
        return self.group_ends[0]

    def pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_train(self, x: Tensor) -> EncodeOutput:
        post = torch.relu(self.pre_acts(x))
        f_core, nc = post[:, : self.c], post[:, self.c :]
        n_tokens = x.shape[0]
        core_nnz = (f_core > 0).sum()
        budget = self.k * n_tokens
        if self.l0_budget == "dynamic":
            budget = max(0, budget - int(core_nnz))
        budget = min(budget, nc.numel())
        flat = nc.flatten()
        f_nc = torch.zeros_like(flat)
        if budget > 0:
            vals, idx = flat.topk(budget, sorted=False)
            f_nc = f_nc.scatter(0, idx, vals)
            pos = vals[vals > 0]
            min_sel = pos.min().detach() if pos.numel() else post.new_tensor(-1.0)
        else:
            min_sel = post.new_tensor(-1.0)
        f = torch.cat([f_core, f_nc.view_as(nc)], dim=1)
        return EncodeOutput(f, post, core_nnz.float() / n_tokens, min_sel)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Inference: core ReLU, non-core JumpReLU at the learned global threshold."""
        if self.threshold < 0:
            return self.encode_train(x).f
        post = torch.relu(self.pre_acts(x))
        nc = post[:, self.c :]
        return torch.cat([post[:, : self.c], nc * (nc > self.threshold)], dim=1)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def decode_nested(self, f: Tensor, width: int) -> Tensor:
        return f[:, :width] @ self.W_dec[:width] + self.b_dec

    def nested_reconstructions(self, f: Tensor) -> list[Tensor]:
        """x_hat for every level, innermost first; each level adds one group to the last."""
        acc = self.b_dec + f[:, : self.c] @ self.W_dec[: self.c]
        outs = [acc] if self.bias_level else []
        start = self.c
        for end in self.group_ends:
            acc = acc + f[:, start:end] @ self.W_dec[start:end]
            outs.append(acc)
            start = end
        return outs

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # -- training helpers ---------------------------------------------------------------
    def loss(
        self, x: Tensor, aux_alpha: float = 1 / 32, dead_tokens: int = 10_000_000
    ) -> tuple[Tensor, dict[str, Tensor]]:
        enc = self.encode_train(x)
        recons = self.nested_reconstructions(enc.f)
        level_mse = torch.stack([(x - r).pow(2).sum(-1).mean() for r in recons])
        recon_loss = level_mse.mean()  # w_l = 1/(L+1)
        dead = self.dead_mask(dead_tokens)
        aux = self.aux_loss(x, recons[-1], enc.post, dead)
        with torch.no_grad():
            self.update_fired(enc.f, x.shape[0])
        total = recon_loss + aux_alpha * aux
        l0 = (enc.f > 0).sum(-1).float().mean()
        return total, {
            "loss": total.detach(),
            "mse": level_mse[-1].detach(),
            "nested_mse": level_mse[0].detach(),
            "level_mse": level_mse.detach(),
            "aux_loss": aux.detach(),
            "l0": l0.detach(),
            "core_l0": enc.core_l0.detach(),
            "dead": dead.sum().float(),
            "min_selected": enc.min_selected,
        }

    def dead_mask(self, dead_tokens: int) -> Tensor:
        dead = self.tokens_since_fired >= dead_tokens
        dead[: self.c] = False  # frozen core encoders cannot be revived by aux-k
        return dead

    def aux_loss(self, x: Tensor, x_hat: Tensor, post: Tensor, dead: Tensor) -> Tensor:
        """Normalised aux-k on dead non-core latents (dictionary_learning form)."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        k_aux = min(self.d_in // 2, n_dead)
        masked = torch.where(dead[None], post, torch.full_like(post, -math.inf))
        vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(post).scatter(-1, idx, vals.clamp_min(0))
        recon = acts @ self.W_dec
        r = (x - x_hat).detach()
        num = (r - recon).pow(2).sum(-1).mean()
        den = (r - r.mean(0, keepdim=True)).pow(2).sum(-1).mean()
        out = num / den
        return torch.nan_to_num(out, nan=0.0, posinf=0.0)

    @torch.no_grad()
    def update_fired(self, f: Tensor, n_tokens: int) -> None:
        fired = (f > 0).any(0)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def update_threshold(self, min_selected: Tensor, beta: float) -> None:
        if min_selected < 0:
            return
        if self.threshold < 0:
            self.threshold.copy_(min_selected)
        else:
            self.threshold.mul_(beta).add_((1 - beta) * min_selected)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    # -- persistence --------------------------------------------------------------------
    def hparams(self) -> dict:
        return {
            "d_in": self.d_in,
            "width": self.width,
            "k": self.k,
            "core_size": self.c,
            "groups": self.groups,
            "l0_budget": self.l0_budget,
            "bias_level": self.bias_level,
        }

    @classmethod
    def from_state(cls, hp: dict, state: dict[str, Tensor]) -> MatryoshkaBatchTopKSAE:
        sae = cls(
            hp["d_in"],
            hp["width"],
            hp["k"],
            hp["core_size"],
            group_fractions=[g / (hp["width"] - hp["core_size"]) for g in hp["groups"]],
            l0_budget=hp["l0_budget"],
            bias_level=hp["bias_level"],
        )
        sae.groups = list(hp["groups"])  # exact sizes, not re-derived from fractions
        sae.load_state_dict(state)
        return sae


@torch.no_grad()
def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm, as dictionary_learning uses to initialise b_dec."""
    guess = x.mean(0)
    for _ in range(max_iter):
        prev = guess
        w = 1 / (x - guess).norm(dim=1).clamp_min(1e-8)
        guess = (w[:, None] * x).sum(0) / w.sum()
        if (guess - prev).norm() < tol:
            break
    return guess
