import pytest
import torch

from dmsae_ray.algo.core import Core, jaccard, select_core, select_minimal, selection_counts
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE


def brute_force_min(scores: list[float], tau: float) -> int:
    total = sum(scores)
    best = sorted(scores, reverse=True)
    for n in range(1, len(scores) + 1):
        if sum(best[:n]) >= tau * total - 1e-12:
            return n
    return len(scores)


def test_selection_is_minimal_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        s = torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) > 0.3)
        if trial % 3 == 0:
            s = torch.round(s * 4) / 4  # many ties
        tau = float(torch.rand(1, generator=gen)) * 0.99 + 0.01
        picked, frac = select_minimal(s, tau)
        if s.sum() == 0:
            assert picked == [] and frac == 0.0
            continue
        assert len(picked) == brute_force_min(s.tolist(), tau)
        assert frac >= tau - 1e-9
        assert (
            float(s[picked].sum() / s.sum()) == frac
            or abs(float(s[picked].sum() / s.sum()) - frac) < 1e-6
        )


def test_selection_ties_all_zero_and_full_fraction():
    assert select_minimal(torch.zeros(5), 0.9) == ([], 0.0)
    picked, frac = select_minimal(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5)
    assert picked == [0, 1] and frac == 0.5  # exactly half, lower index first among ties
    picked, _ = select_minimal(torch.tensor([0.0, 2.0, 0.0, 1.0]), 1.0)
    assert picked == [1, 3]  # zeros never enter even at tau = 1
    picked, _ = select_minimal(torch.tensor([0.1, 5.0, 0.2]), 0.9)
    assert picked == [1]  # ordered best first


def test_reselect_can_drop_old_core_and_accumulate_keeps_it():
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(8, 128, 4, core_size=3, group_fractions=[0.5, 0.5], cycle=2)
    sae.origin_cycle[:3] = torch.tensor([0, 1, 1])
    pooled = torch.zeros(sae.nested_width)
    pooled[5] = 10.0
    pooled[1] = 0.5
    re = select_core(sae, pooled, 0.9, "reselect", None)
    assert re.indices == [5] and re.ids == [(2, 5)]
    acc = select_core(sae, pooled, 0.9, "accumulate", None)
    assert acc.indices == [0, 1, 2, 5]
    capped = select_core(sae, pooled, 1.0, "reselect", max_core=1)
    assert capped.indices == [5]
    # the truncated core's fraction is what it explains, not what the full selection did
    assert capped.fraction == 10.0 / 10.5
    assert select_core(sae, pooled, 1.0, "reselect", None).fraction == 1.0


def test_core_of_carries_vectors_ids_and_biases_in_selection_order():
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(8, 64, 4, core_size=2, group_fractions=[0.5, 0.5], cycle=3)
    with torch.no_grad():
        sae.b_enc.normal_()
    core = Core.of(sae, [9, 1])
    assert torch.equal(core.vectors, sae.W_enc[:, [9, 1]])
    assert torch.equal(core.bias, sae.b_enc[[9, 1]].detach())
    assert core.ids == [(3, 9), (3, 1)] and core.size == 2
    with pytest.raises(ValueError, match="ids"):
        Core(core.vectors, core.ids[:1], core.bias)


def test_jaccard_and_counts_by_persistent_id():
    a = [(0, 1), (0, 2), (1, 5)]
    b = [(0, 2), (1, 5), (2, 9)]
    assert jaccard(a, b) == 2 / 4
    assert jaccard([], []) == 1.0
    counts = selection_counts([a, b, [(0, 2)]])
    assert counts[(0, 2)] == 3 and counts[(2, 9)] == 1
