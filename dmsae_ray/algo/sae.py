"""Matryoshka BatchTopK SAE with a frozen core block (docs/algorithm.md sections 2-3).

Latents ``[0, c)`` are the core: encoder columns copied from the previous cycle and kept as a
buffer so no optimiser can ever touch them. Latents ``[c, K)`` are non-core, split into nested
Matryoshka groups and sparsified with a global BatchTopK. How the core fires is
``core_activation``:

- ``relu``: the core is a plain ReLU outside BatchTopK (as the paper describes it); the non-core
  gets what is left of the ``k * B`` budget (``l0_budget: dynamic``) or all of it (``fixed``).
  A core that fires on more than ``k`` latents per token overflows the budget: total L0 > k.
- ``batchtopk``: core latents enter the same global top-(k*B) selection as every other latent
  and share the inference threshold, so the total L0 is k by construction.

The SAE works in the normalised input scale (``x / norm_factor``); callers normalise.

Training (``loss``) runs a sparse fast path by default: one dense encoder GEMM to find the
BatchTopK selection, then every other product (decoder, nested levels, aux-k, and all backward
products) touches only the selected latents, as CSR sparse-dense products. ``fast = False`` (or
``loss_reference``) runs the plain dense reference the fast path is tested against
(``tests/test_fast_path.py``); both give the same codes, reconstructions, loss and gradients.
This module is the model; the selection and sparse autograd kernels it calls are in
``kernels.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dmsae_ray.algo.fast_path import SparsePath
from dmsae_ray.algo.kernels import (
    geometric_median,
    global_topk,
    nested_mse,
)

if TYPE_CHECKING:  # annotations only: importing the SAE loads no config machinery
    from dmsae_ray.config import SAEConfig


def group_sizes(
    width: int, core: int, fractions: list[float], mode: str = "fractions"
) -> list[int]:
    """Non-core Matryoshka group sizes (docs/algorithm.md section 2)."""
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


CORE_ACTIVATIONS = ("relu", "batchtopk")


@dataclass
class EncodeOutput:
    f: Tensor  # [B, K] sparse codes
    post: Tensor  # [B, K] post-ReLU pre-activations (for aux-k)
    core_l0: Tensor  # scalar: active core latents per token
    min_selected: Tensor  # scalar: smallest positive selected non-core activation (or -1)


class MatryoshkaBatchTopKSAE(SparsePath, nn.Module):
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
        core_activation: str = "relu",
    ) -> None:
        super().__init__()
        if core_activation not in CORE_ACTIVATIONS:
            raise ValueError(f"core_activation must be one of {CORE_ACTIVATIONS}")
        fractions = group_fractions or [1.0]
        self.d_in, self.width, self.k, self.c = d_in, width, k, core_size
        self.l0_budget = l0_budget
        self.core_activation = core_activation
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
        # Not state: how ``loss`` computes, never what it computes.
        self.fast = True  # sparse fast path; False: the dense eager reference
        # None: avoid the host sync of the dynamic budget on accelerators only (free on CPU).
        self.sync_free_budget: bool | None = None
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
        self,
        encoder_columns: Tensor,
        origin_cycle: Tensor,
        origin_index: Tensor,
        tied: bool,
        bias: Tensor | None = None,
    ) -> None:
        """Copy the previous cycle's core encoder vectors (in selection order) into [0, c);
        ``bias``: their starting encoder biases (``core_bias: carry``), else they start at 0."""
        if encoder_columns.shape != (self.d_in, self.c):
            raise ValueError(f"core must be [{self.d_in}, {self.c}], got {encoder_columns.shape}")
        self.W_enc_core.copy_(encoder_columns)
        if bias is not None:
            if bias.shape != (self.c,):
                raise ValueError(f"core bias must be [{self.c}], got {tuple(bias.shape)}")
            self.b_enc[: self.c] = bias
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

    @property
    def core_in_topk(self) -> bool:
        """Whether core latents compete in BatchTopK (and so obey the inference threshold)."""
        return self.core_activation == "batchtopk"

    def encode_train(self, x: Tensor) -> EncodeOutput:
        post = torch.relu(self.pre_acts(x))
        n_tokens, c = x.shape[0], self.c
        if self.core_in_topk:
            f, min_sel = global_topk(post, self.k * n_tokens)
            core_nnz = (f[:, :c] > 0).sum()
            return EncodeOutput(f, post, core_nnz.float() / n_tokens, min_sel)
        f_core, nc = post[:, :c], post[:, c:]
        core_nnz = (f_core > 0).sum()
        budget = self.k * n_tokens
        if self.l0_budget == "dynamic":
            budget = max(0, budget - int(core_nnz))
        f_nc, min_sel = global_topk(nc, budget)
        f = torch.cat([f_core, f_nc], dim=1)
        return EncodeOutput(f, post, core_nnz.float() / n_tokens, min_sel)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Inference: JumpReLU at the learned global threshold; a ``relu`` core is exempt."""
        if self.threshold < 0:
            return self.encode_train(x).f
        post = torch.relu(self.pre_acts(x))
        gated = post * (post > self.threshold)
        if self.core_in_topk:
            return gated
        return torch.cat([post[:, : self.c], gated[:, self.c :]], dim=1)

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
        if not self.fast:
            return self.loss_reference(x, aux_alpha, dead_tokens)
        codes = self.encode_sparse(x)
        parts = self.sparse_parts(codes)
        level_mse, residual = nested_mse(x - self.sparse_base(codes), parts, self.bias_level)
        recon_loss = nested_recon_loss(level_mse)
        dead = self.dead_mask(dead_tokens)
        aux = self.aux_loss_sparse(x, residual, codes, dead)
        self.update_fired_sparse(codes, x.shape[0])
        total = recon_loss + aux_alpha * aux
        nnz = (codes.f_core > 0).sum() + (codes.vals > 0).sum()
        l0 = nnz.float() / x.shape[0]
        return total, _loss_metrics(total, level_mse, aux, l0, codes.core_l0, dead,
                                    codes.min_selected)

    def loss_reference(
        self, x: Tensor, aux_alpha: float = 1 / 32, dead_tokens: int = 10_000_000
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The dense eager loss, line by line docs/algorithm.md section 3."""
        enc = self.encode_train(x)
        recons = self.nested_reconstructions(enc.f)
        level_mse = torch.stack([(x - r).pow(2).sum(-1).mean() for r in recons])
        recon_loss = nested_recon_loss(level_mse)
        dead = self.dead_mask(dead_tokens)
        aux = self.aux_loss(x, recons[-1], enc.post, dead)
        with torch.no_grad():
            self.update_fired(enc.f, x.shape[0])
        total = recon_loss + aux_alpha * aux
        l0 = (enc.f > 0).sum(-1).float().mean()
        return total, _loss_metrics(total, level_mse, aux, l0, enc.core_l0, dead,
                                    enc.min_selected)

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
        return self._aux_ratio(x - x_hat, acts @ self.W_dec)

    @torch.no_grad()
    def update_fired(self, f: Tensor, n_tokens: int) -> None:
        fired = (f > 0).any(0)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def update_threshold(self, min_selected: Tensor, beta: float) -> None:
        """EMA of the smallest selected activation; a batch with none (-1) leaves it alone.

        Written with ``where`` so it never syncs with the host (``if tensor < 0`` would).
        """
        m = torch.as_tensor(min_selected, device=self.threshold.device).to(self.threshold.dtype)
        ema = torch.where(self.threshold < 0, m, self.threshold * beta + (1 - beta) * m)
        self.threshold.copy_(torch.where(m < 0, self.threshold, ema))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        grad = self.W_dec.grad
        if grad is not None:
            w = self.W_dec
            # In place: at K x d = 65k x 2304 every temporary is another 600 MB pass.
            grad.addcmul_(torch.linalg.vecdot(grad, w)[:, None], w, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    # -- construction and persistence ---------------------------------------------------
    @classmethod
    def from_config(
        cls, cfg: SAEConfig, d_in: int, core_size: int = 0, cycle: int = 0
    ) -> MatryoshkaBatchTopKSAE:
        """A freshly initialised SAE with the shape and options of ``cfg`` (the ``sae``
        section); the core columns are still zero (``set_core`` fills them)."""
        return cls(
            d_in,
            cfg.width,
            cfg.k,
            core_size=core_size,
            group_fractions=cfg.group_fractions,
            group_mode=cfg.group_mode,
            l0_budget=cfg.l0_budget,
            bias_level=cfg.bias_level,
            cycle=cycle,
            core_activation=cfg.core_activation,
        )

    def hparams(self) -> dict:
        return {
            "d_in": self.d_in,
            "width": self.width,
            "k": self.k,
            "core_size": self.c,
            "groups": self.groups,
            "l0_budget": self.l0_budget,
            "bias_level": self.bias_level,
            "core_activation": self.core_activation,
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
            # SAEs saved before the option existed had a plain ReLU core.
            core_activation=hp.get("core_activation", "relu"),
        )
        sae.groups = list(hp["groups"])  # exact sizes, not re-derived from fractions
        sae.load_state_dict(state)
        return sae


def nested_recon_loss(level_mse: Tensor) -> Tensor:
    """dictionary_learning's Matryoshka BatchTopK reconstruction term: every level's MSE times
    its weight w_l = 1/L, then the mean of those weighted terms, i.e. sum_l mse_l / L^2.

    Adam does not care about a constant factor, but aux-k is added after this term and the
    gradient is clipped at a fixed global norm, so the normalisation sets aux-k's weight and
    when clipping bites: with this form, ``aux_alpha = 1/32`` means what it means in
    dictionary_learning (and in the SAEBench Matryoshka baselines trained with it).
    """
    n_levels = level_mse.shape[0]
    return (level_mse / n_levels).mean()


def _loss_metrics(
    total: Tensor, level_mse: Tensor, aux: Tensor, l0: Tensor, core_l0: Tensor, dead: Tensor,
    min_selected: Tensor,
) -> dict[str, Tensor]:
    """The step metrics both loss paths report, detached (no graph kept alive by logging)."""
    return {
        "loss": total.detach(),
        "mse": level_mse[-1].detach(),
        "nested_mse": level_mse[0].detach(),
        "level_mse": level_mse.detach(),
        "aux_loss": aux.detach(),
        "l0": l0.detach(),
        "core_l0": core_l0.detach(),
        "dead": dead.sum().float(),
        "min_selected": min_selected,
    }
