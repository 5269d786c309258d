"""dmsae_ray/algo/kernels.py on its own: the BatchTopK selection and the geometric median (the
sparse autograd functions are checked against the dense reference in tests/test_fast_path.py)."""

from __future__ import annotations

import pytest
import torch

from dmsae_ray.algo.kernels import batch_topk_positions, geometric_median


@pytest.mark.parametrize("budget", [1, 97, 5000, 40_000])
def test_threshold_selection_is_the_exact_top_k(budget):
    flat = torch.randn(300_000, generator=torch.Generator().manual_seed(budget))
    pos = batch_topk_positions(flat, budget)
    assert torch.equal(pos, flat.topk(budget).indices.sort().values)


def test_threshold_selection_with_ties_and_a_misleading_sample():
    # Many ties: any top-k set is correct, so compare the selected values.
    flat = torch.randint(0, 50, (200_000,)).float()
    pos = batch_topk_positions(flat, 30_000)
    assert pos.numel() == 30_000 and torch.all(pos[1:] > pos[:-1])
    torch.testing.assert_close(flat[pos].sort().values, flat.topk(30_000).values.sort().values)
    # The strided sample (every 5th entry at this size) sees only the large values, so the
    # bound it gives is too high: the selection must notice and fall back to the exact top-k.
    flat = torch.rand(1 << 20, generator=torch.Generator().manual_seed(0))
    flat[::5] += 2
    pos = batch_topk_positions(flat, 300_000)
    assert torch.equal(pos, flat.topk(300_000).indices.sort().values)
    assert batch_topk_positions(flat, 0).numel() == 0
    assert torch.equal(batch_topk_positions(flat, 1 << 21), torch.arange(flat.numel()))


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.zeros(50, 3), torch.full((3, 3), 1000.0)])
    assert geometric_median(x).norm() < 1.0 < x.mean(0).norm()
