"""Matryoshka BatchTopK SAE with a frozen core block (ALGORITHM.md sections 4-6).

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

from dmsae_ray.kernels import (
    SparsePattern,
    batch_topk_positions,
    geometric_median,
    global_topk,
    min_positive,
    nested_mse,
    sampled_pre,
    sparse_decode,
)

if TYPE_CHECKING:  # annotations only: importing the SAE loads no config machinery
    from dmsae_ray.config import SAEConfig


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


CORE_ACTIVATIONS = ("relu", "batchtopk")


@dataclass
class EncodeOutput:
    f: Tensor  # [B, K] sparse codes
    post: Tensor  # [B, K] post-ReLU pre-activations (for aux-k)
    core_l0: Tensor  # scalar: active core latents per token
    min_selected: Tensor  # scalar: smallest positive selected non-core activation (or -1)


@dataclass
class SparseCodes:
    """Codes of the fast path: the core dense, the selected non-core latents as sparse entries.

    ``pattern`` holds the entries in row-major order (token, then latent) with columns relative
    to the first non-core latent; ``cols`` are the absolute latent indices.
    """

    f_core: Tensor  # [B, c] core activations (dense: the core is small and ~half active)
    pattern: SparsePattern  # [B, K - c] positions of the selected non-core latents
    cols: Tensor  # [nnz] absolute latent index (>= c)
    vals: Tensor  # [nnz] activation; 0 for slots beyond a dynamic budget (sync-free path)
    pre_nc: Tensor  # [B, K - c] non-core pre-activations, no grad (selection and aux-k)
    core_l0: Tensor
    min_selected: Tensor

    @property
    def rows(self) -> Tensor:
        return self.pattern.rows

    def to_dense(self) -> Tensor:
        """[B, K] codes, equal to ``encode_train(x).f``."""
        f_nc = self.vals.new_zeros(self.pre_nc.shape)
        f_nc = f_nc.index_put((self.pattern.rows, self.pattern.cols), self.vals)
        return torch.cat([self.f_core.to(f_nc.dtype), f_nc], dim=1)


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

    # -- sparse fast path ---------------------------------------------------------------
    def encode_sparse(self, x: Tensor) -> SparseCodes:
        """``encode_train`` as sparse entries, with gradients like ``encode_train``'s."""
        if self.core_in_topk and self.c:
            return self._encode_sparse_shared(x)
        n = x.shape[0]
        c, nc = self.c, self.width - self.c
        xc = x - self.b_dec
        if c:
            f_core = torch.relu(xc @ self.W_enc_core + self.b_enc[:c])
        else:
            f_core = x.new_zeros(n, 0)
        core_nnz = (f_core > 0).sum()
        b_nc = self.b_enc[c:]
        with torch.no_grad():
            # ReLU is skipped: the top entries of pre and of ReLU(pre) are the same set up to
            # zero-valued picks, which contribute neither values nor gradients.
            pre_nc = torch.addmm(b_nc, xc.detach(), self.W_enc_nc)
        flat = pre_nc.view(-1)
        most = min(self.k * n, flat.numel())
        keep = None
        sync_free = self.sync_free_budget
        if sync_free is None:
            sync_free = x.device.type != "cpu"
        if self.l0_budget == "dynamic" and sync_free:
            # Select the static maximum and zero the ranks past k*B - nnz(core) on the device,
            # so the budget never needs int() (a host sync) before the top-k.
            _, idx = flat.topk(most, sorted=True)
            budget = (self.k * n - core_nnz).clamp(0, most)
            ranked = torch.arange(most, device=flat.device) < budget
            pos, order = idx.sort()
            keep = ranked[order]
        else:
            budget = most
            if self.l0_budget == "dynamic":
                budget = min(max(0, self.k * n - int(core_nnz)), most)
            pos = batch_topk_positions(flat, budget)
        rows, cols_nc = pos // nc, pos % nc
        raw = flat[pos]
        vals, pattern = self._selected_values(x, rows, cols_nc, raw)
        if keep is not None:
            vals = vals * keep
        return SparseCodes(
            f_core, pattern, cols_nc + c, vals, pre_nc, core_nnz.float() / n,
            min_positive(vals),
        )

    def _encode_sparse_shared(self, x: Tensor) -> SparseCodes:
        """``core_activation: batchtopk``: one global top-(k*B) over core and non-core.

        Splitting the selection into its core and non-core entries has a data-dependent size,
        so on an accelerator this path syncs with the host once per step (the ``relu`` path
        with a dynamic budget avoids that; see ``sync_free_budget``).
        """
        n = x.shape[0]
        c, width = self.c, self.width
        xc = x - self.b_dec
        pre_core = xc @ self.W_enc_core + self.b_enc[:c]
        with torch.no_grad():
            pre_nc = torch.addmm(self.b_enc[c:], xc.detach(), self.W_enc_nc)
            pre = torch.cat([pre_core.detach().to(pre_nc.dtype), pre_nc], dim=1)
        flat = pre.view(-1)
        pos = batch_topk_positions(flat, min(self.k * n, flat.numel()))
        rows, cols = pos // width, pos % width
        in_core = cols < c
        core_mask = torch.zeros(n, c, dtype=torch.bool, device=x.device)
        core_mask[rows[in_core], cols[in_core]] = True
        f_core = torch.relu(pre_core) * core_mask
        pick = ~in_core
        rows, cols_nc, raw = rows[pick], cols[pick] - c, flat[pos[pick]]
        vals, pattern = self._selected_values(x, rows, cols_nc, raw)
        core_nnz = (f_core > 0).sum()
        min_sel = min_positive(vals, f_core.detach().flatten())
        return SparseCodes(
            f_core, pattern, cols_nc + c, vals, pre_nc, core_nnz.float() / n, min_sel
        )

    def _selected_values(
        self, x: Tensor, rows: Tensor, cols_nc: Tensor, raw: Tensor
    ) -> tuple[Tensor, SparsePattern]:
        """The selected non-core activations (row-major entries) with their gradient path."""
        pattern = SparsePattern.from_rows(rows, cols_nc, x.shape[0], self.width - self.c)
        b_nc = self.b_enc[self.c :]
        vals = torch.relu(sampled_pre(raw, x, self.b_dec, self.W_enc_nc, b_nc, pattern))
        return vals, pattern

    def sparse_parts(self, codes: SparseCodes) -> Tensor:
        """[B, groups, d]: each group's contribution, from one sparse product whose CSR rows
        are the (token, group) pairs (entries are row-major, so those rows are sorted too)."""
        n, n_groups = codes.f_core.shape[0], len(self.groups)
        inner = self._inner_ends(codes.cols.device)
        bag = codes.rows * n_groups + torch.bucketize(codes.cols, inner, right=True)
        # Same columns in the same order as the encoder pattern: share its column sort.
        pattern = SparsePattern.from_rows(
            bag, codes.cols, n * n_groups, self.width, codes.pattern.column_order()
        )
        parts = sparse_decode(codes.vals, self.W_dec, pattern)
        return parts.view(n, n_groups, -1)

    def _inner_ends(self, device: torch.device) -> Tensor:
        # Cached: building it from a list every step would be a blocking host-to-device copy.
        # Keyed by the groups too, since ``from_state`` assigns them after construction.
        key = (tuple(self.groups), self.c, str(device))
        cache = self.__dict__.setdefault("_ends_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = torch.tensor(self.group_ends[:-1], device=device)
        return cache[key]

    def sparse_base(self, codes: SparseCodes) -> Tensor:
        """b_dec plus the core's reconstruction [B, d]."""
        if self.c:
            return self.b_dec + codes.f_core @ self.W_dec[: self.c]
        return self.b_dec.expand(codes.f_core.shape[0], -1)

    def sparse_levels(self, codes: SparseCodes) -> Tensor:
        """[B, levels, d]: ``nested_reconstructions`` stacked, from sparse codes."""
        base = self.sparse_base(codes)
        levels = base[:, None] + self.sparse_parts(codes).cumsum(1)
        if self.bias_level:
            levels = torch.cat([base[:, None].to(levels.dtype), levels], dim=1)
        return levels

    def aux_loss_sparse(
        self, x: Tensor, residual: Tensor, codes: SparseCodes, dead: Tensor
    ) -> Tensor:
        """``aux_loss`` with the dead latents' top-k_aux as sparse entries (``residual`` is
        x - x_hat, the full reconstruction's error)."""
        n_dead = int(dead.sum())  # one host sync: the dead set fixes the shapes below
        if n_dead == 0:
            return x.new_zeros(())
        n, c = x.shape[0], self.c
        k_aux = min(self.d_in // 2, n_dead)
        dead_nc = dead[c:].nonzero().squeeze(1)
        sub = codes.pre_nc[:, dead_nc]
        j = sub.topk(k_aux, dim=-1, sorted=False).indices.sort(dim=-1).values
        cols_nc = dead_nc[j].flatten()
        raw = sub.gather(1, j).flatten()
        rows = torch.arange(n, device=x.device).repeat_interleave(k_aux)
        crow = torch.arange(n + 1, device=x.device) * k_aux
        enc = SparsePattern(crow, rows, cols_nc, self.width - c)
        b_nc = self.b_enc[c:]
        acts = torch.relu(sampled_pre(raw, x, self.b_dec, self.W_enc_nc, b_nc, enc))
        dec = SparsePattern(crow, rows, cols_nc + c, self.width, enc.column_order())
        recon = sparse_decode(acts, self.W_dec, dec)
        return self._aux_ratio(residual, recon)

    @staticmethod
    def _aux_ratio(residual: Tensor, recon: Tensor) -> Tensor:
        r = residual.detach()
        num = (r - recon).pow(2).sum(-1).mean()
        den = (r - r.mean(0, keepdim=True)).pow(2).sum(-1).mean()
        return torch.nan_to_num(num / den, nan=0.0, posinf=0.0)

    @torch.no_grad()
    def update_fired_sparse(self, codes: SparseCodes, n_tokens: int) -> None:
        hits = self.tokens_since_fired.new_zeros(self.width, dtype=torch.float32)
        hits.index_add_(0, codes.cols, (codes.vals > 0).float())
        fired = hits > 0
        if self.c:
            fired[: self.c] = (codes.f_core > 0).any(0)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)  # masked_fill: no sync, unlike t[mask] = 0

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
        """The dense eager loss, line by line ALGORITHM.md sections 4-5."""
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
