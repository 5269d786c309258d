"""The SAE's sparse fast path: ``MatryoshkaBatchTopKSAE.loss`` in CSR products.

One dense encoder GEMM finds the BatchTopK selection; every other product (decoder, nested
levels, aux-k, and all backward products) touches only the selected latents, through the
kernels of ``kernels.py``. ``SparsePath`` is a mixin of the model class in ``sae.py``: its
methods read the model's parameters and groups, so they are the model's methods, kept apart
only so that each file has one job (the model and its dense reference there, the fast path
here). ``tests/test_fast_path.py`` checks that both give the same codes, reconstructions, loss
and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dmsae_ray.algo.kernels import (
    SparsePattern,
    batch_topk_positions,
    min_positive,
    sampled_pre,
    sparse_decode,
)


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


class SparsePath:
    """The fast-path methods of ``MatryoshkaBatchTopKSAE`` (see the module docstring)."""

    if TYPE_CHECKING:  # what the model class provides
        c: int
        width: int
        k: int
        d_in: int
        groups: list[int]
        group_ends: list[int]
        l0_budget: str
        bias_level: bool
        core_in_topk: bool
        sync_free_budget: bool | None
        b_dec: Tensor
        b_enc: Tensor
        W_enc_core: Tensor
        W_enc_nc: Tensor
        W_dec: Tensor
        tokens_since_fired: Tensor

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
