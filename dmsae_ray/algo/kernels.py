"""The SAE's tensor kernels: BatchTopK selection, b_dec's starting point and the sparse autograd
functions of the fast path. ``sae.py`` holds the model; this module holds no model state and
knows no config.

- Selection: ``global_topk`` (the dense reference's BatchTopK), ``batch_topk_positions`` (the
  fast path's exact top-k set, cheaper than ``topk`` on CPU), ``min_positive`` (what the
  inference threshold tracks, without a host sync).
- Initialisation: ``geometric_median``, where b_dec starts.
- Sparse products: a ``SparsePattern`` holds the positions of the selected entries (CSR, row-major
  order); ``sampled_pre`` gives the encoder pre-activations at those positions with a sparse
  backward, ``sparse_decode`` the CSR x dense decoder product with a sparse backward, and
  ``nested_mse`` every nested level's error from one running residual.

Each function gives the same values and gradients as the dense autograd graph it replaces
(``tests/test_fast_path.py`` checks them through ``MatryoshkaBatchTopKSAE.loss``); why each is
shaped as it is, and the kernels compared for each product: BENCHMARKS.md, "The fast path".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# -- selection --------------------------------------------------------------------------


def global_topk(post: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """BatchTopK over a [B, n] block: the ``budget`` largest entries kept, the rest zeroed;
    also the smallest positive kept value (-1 if none), which the inference threshold tracks."""
    flat = post.flatten()
    budget = min(budget, flat.numel())
    if budget <= 0:
        return torch.zeros_like(post), post.new_tensor(-1.0)
    vals, idx = flat.topk(budget, sorted=False)
    f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(post)
    pos = vals[vals > 0]
    min_sel = pos.min().detach() if pos.numel() else post.new_tensor(-1.0)
    return f, min_sel


# Below this many candidates an exact flat top-k is already cheap.
_THRESHOLD_SELECT_MIN = 1 << 16
_SAMPLE_TARGET = 1 << 18


def batch_topk_positions(
    flat: Tensor, budget: int, min_size: int = _THRESHOLD_SELECT_MIN
) -> Tensor:
    """Sorted flat positions of the ``budget`` largest entries of ``flat`` (exact top-k set).

    On CPU ``flat.topk`` is a single-threaded selection over all B*K entries and costs about half
    an encoder GEMM at K=16k. Instead: estimate a lower bound on the budget-th largest value from
    a strided sample (with a 4-sigma margin), keep the entries above it (one vectorised pass) and
    run the exact top-k on those few candidates. If the bound was too high the candidates are too
    few and we fall back to the exact top-k, so the result never depends on the sample.
    """
    n = flat.numel()
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    if budget >= n:
        return torch.arange(n, device=flat.device)
    if n >= min_size and flat.device.type == "cpu":
        stride = max(1, n // _SAMPLE_TARGET)
        stride += 1 - stride % 2  # odd: a power-of-two row length then still covers every column
        sample = flat[::stride]
        m = sample.numel()
        expected = budget / n * m
        above = math.ceil(expected + 4 * math.sqrt(expected) + 16)
        if above < m:
            lower = sample.kthvalue(m - above + 1).values
            cand = (flat >= lower).nonzero().squeeze(1)
            if cand.numel() >= budget:
                keep = flat[cand].topk(budget, sorted=False).indices
                return cand[keep].sort().values
    return flat.topk(budget, sorted=False).indices.sort().values


def min_positive(*parts: Tensor) -> Tensor:
    """Smallest positive entry over the parts (-1 when there is none), without a host sync."""
    lows = [
        torch.where(p > 0, p, torch.full_like(p, math.inf)).min() for p in parts if p.numel()
    ]
    if not lows:
        return parts[0].new_tensor(-1.0)
    low = torch.stack([v.to(lows[0].dtype) for v in lows]).min().detach()
    return torch.where(torch.isinf(low), torch.full_like(low, -1.0), low)


# -- initialisation ---------------------------------------------------------------------


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


# -- sparse products --------------------------------------------------------------------


_csr_warned = False


def _csr(crow: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    # Invariants hold by construction (sorted entries); checking them would sync on a GPU.
    global _csr_warned
    if _csr_warned:
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)
    # torch warns once per process that CSR support is "beta"; we use it knowingly. Only the
    # first call needs the filter (a global filter would not survive pytest's warning capture).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        out = torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)
    _csr_warned = True
    return out


def _wide(t: Tensor) -> Tensor:
    """fp32 for half types (torch's sparse kernels do not take bf16); fp32/fp64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass
class SparsePattern:
    """Positions of sparse entries in an ``n_rows x n_cols`` matrix, in row-major order."""

    crow: Tensor  # [n_rows + 1] CSR row pointer
    rows: Tensor  # [nnz] row of each entry
    cols: Tensor  # [nnz] column of each entry
    n_cols: int
    order: Tensor | None = None  # argsort of cols; computed once when first needed, shareable

    @classmethod
    def from_rows(
        cls, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int, order: Tensor | None = None
    ) -> SparsePattern:
        """The pattern of entries given by their (sorted) rows and their columns."""
        crow = torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))
        return cls(crow, rows, cols, n_cols, order)

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1

    def csr(self, vals: Tensor) -> Tensor:
        return _csr(self.crow, self.cols, vals, (self.n_rows, self.n_cols))

    def column_order(self) -> Tensor:
        if self.order is None:
            self.order = torch.argsort(self.cols, stable=True)
        return self.order

    def transposed_mm(self, vals: Tensor, dense: Tensor) -> Tensor:
        """S^T @ dense [n_cols, d] as an embedding_bag over the entries grouped by column.

        On CPU this beats the CSR^T product by ~25-40% (each output row is written once).
        """
        order = self.column_order()
        cols = self.cols[order]
        offsets = torch.searchsorted(cols, torch.arange(self.n_cols, device=cols.device))
        return nn.functional.embedding_bag(
            self.rows[order], dense, offsets, mode="sum", per_sample_weights=vals[order]
        )


def sampled_pre(
    values: Tensor, x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor,
    pattern: SparsePattern,
) -> Tensor:
    """The entries of (x - b_dec) @ weight + bias at ``pattern``, given as ``values`` (computed
    without grad), with their gradients to x, b_dec, weight and bias; values gets none."""
    return _SampledPre.apply(values, x, b_dec, weight, bias, pattern)


def sparse_decode(vals: Tensor, weight: Tensor, pattern: SparsePattern) -> Tensor:
    """[n_rows, d]: the CSR matrix of ``vals`` at ``pattern`` times ``weight`` [n_cols, d]."""
    return _SparseDecode.apply(vals, weight, pattern)


def nested_mse(r0: Tensor, parts: Tensor, with_r0: bool) -> tuple[Tensor, Tensor]:
    """The MSE of r0 - (parts[:, 0] + ... + parts[:, l]) for every level l (and of r0 itself
    first when ``with_r0``), and the last residual, without grad."""
    return _NestedMSE.apply(r0, parts, with_r0)


class _SparseDecode(torch.autograd.Function):
    """out[r] = sum over the entries e of row r of vals[e] * W[cols[e]]: a CSR x dense product.

    Backward stays sparse too: dW = S^T @ grad and dvals[e] = grad[row e] . W[col e], a sampled
    dense-dense product (SDDMM), instead of the two dense [B, K] x [K, d]-sized products.
    Runs outside autocast, in fp32 at least (torch's sparse kernels do not take bf16).
    """

    @staticmethod
    def forward(ctx, vals: Tensor, weight: Tensor, pattern: SparsePattern) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            w = _wide(weight)
            out = torch.sparse.mm(pattern.csr(vals.to(w.dtype)), w)
        ctx.save_for_backward(vals, weight)
        ctx.pattern = pattern
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        vals, weight = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        w = _wide(weight)
        grad = grad.to(w.dtype).contiguous()
        g_vals = g_w = None
        with torch.autocast(weight.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                g_vals = torch.sparse.sampled_addmm(
                    pattern.csr(vals.to(w.dtype)), grad, w.t(), beta=0.0
                )
                g_vals = g_vals.values().to(vals.dtype)
            if ctx.needs_input_grad[1]:
                g_w = pattern.transposed_mm(vals.to(w.dtype), grad).to(weight.dtype)
        return g_vals, g_w, None


class _SampledPre(torch.autograd.Function):
    """Entries of pre = (x - b_dec) @ W + b at the pattern's positions, already computed by the
    dense no-grad GEMM; the backward only touches those entries.

    With g the entry gradients: dW = (x - b_dec)^T S_g, db = column sums of S_g and
    db_dec = -W @ db. The last one is a mat-vec: the dense graph gets it from a full
    [B, K] x [K, d] product for the input gradient.
    """

    @staticmethod
    def forward(ctx, values, x, b_dec, weight, bias, pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(x, b_dec, weight)
        ctx.pattern = pattern
        return values.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, b_dec, weight = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        w = _wide(weight)
        grad = grad.to(w.dtype)
        g_x = g_bdec = g_w = g_b = None
        with torch.autocast(weight.device.type, enabled=False):
            col_sum = grad.new_zeros(pattern.n_cols).index_add_(0, pattern.cols, grad)
            if ctx.needs_input_grad[1]:
                g_x = torch.sparse.mm(pattern.csr(grad), w.t()).to(x.dtype)
            if ctx.needs_input_grad[2]:
                g_bdec = -(w @ col_sum).to(b_dec.dtype)
            if ctx.needs_input_grad[3]:
                xc = (x - b_dec).detach().to(w.dtype)
                g_w = pattern.transposed_mm(grad, xc).t().to(weight.dtype)
            if ctx.needs_input_grad[4]:
                g_b = col_sum.to(weight.dtype)
        return None, g_x, g_bdec, g_w, g_b, None


class _NestedMSE(torch.autograd.Function):
    """Mean squared error of every nested level, from the first residual and the group parts.

    Level l's residual is r0 - (part_0 + ... + part_l), so one running residual updated in
    place gives every level, and the backward runs the same recursion in reverse with a running
    suffix sum of the level gradients. Autograd over a stacked [B, L, d] cumsum makes about
    three times as many full passes over that tensor (the largest activation-sized one here).
    Also returns the last residual (no grad) for aux-k.
    """

    @staticmethod
    def forward(ctx, r0: Tensor, parts: Tensor, with_r0: bool):
        n = r0.shape[0]
        with torch.autocast(parts.device.type, enabled=False):
            r = r0.detach().to(parts.dtype).clone()
            mses = [torch.dot(r.view(-1), r.view(-1)) / n] if with_r0 else []
            for g in range(parts.shape[1]):
                r.sub_(parts[:, g])
                mses.append(torch.dot(r.view(-1), r.view(-1)) / n)
        ctx.save_for_backward(r, parts)
        ctx.with_r0, ctx.r0_dtype = with_r0, r0.dtype
        ctx.mark_non_differentiable(r)
        return torch.stack(mses), r

    @staticmethod
    def backward(ctx, grad_mse: Tensor, _grad_r: Tensor):
        r_last, parts = ctx.saved_tensors
        n, n_groups = parts.shape[0], parts.shape[1]
        coef = grad_mse.to(parts.dtype) * (2 / n)  # d mse_l / d r_l = 2 r_l / n
        r = r_last.clone()
        acc = torch.zeros_like(r)  # sum over levels m >= l of coef_m * r_m
        grad_parts = torch.empty_like(parts)
        first = 1 if ctx.with_r0 else 0
        for g in reversed(range(n_groups)):
            acc.addcmul_(r, coef[first + g])
            torch.neg(acc, out=grad_parts[:, g])
            r.add_(parts[:, g])
        if ctx.with_r0:
            acc.addcmul_(r, coef[0])
        return acc.to(ctx.r0_dtype), grad_parts, None

