"""The sparse fast path of the SAE computes what the dense eager reference computes.

Sizes are picked so that B * (K - c) exceeds the threshold-selection cut-off, i.e. the fast path
really takes its CPU selection route, not the plain top-k it falls back to on small inputs.
"""

import copy

import pytest
import torch

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.algo.trainer import SAETrainer
from dmsae_ray.config import SAEConfig, TrainConfig

FRACS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]
D, WIDTH, K, N = 32, 2048, 8, 64  # N * WIDTH = 131k candidates > 2**16


MODES = ["relu", "batchtopk"]  # core_activation


def make_pair(
    core: int,
    budget: str = "dynamic",
    bias_level: bool = False,
    dtype=torch.float64,
    fracs=FRACS,
    mode: str = "relu",
):
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(
        D, WIDTH, K, core, group_fractions=fracs, l0_budget=budget, bias_level=bias_level,
        core_activation=mode,
    ).to(dtype)
    if core:
        cols = torch.randn(D, core, dtype=dtype) * 0.5
        sae.set_core(cols, torch.zeros(core, dtype=torch.long), torch.arange(core), tied=True)
    with torch.no_grad():
        # Non-zero biases, so the b_dec / b_enc gradient paths are exercised with real values.
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.05)
    ref = copy.deepcopy(sae)
    ref.fast = False
    return sae, ref


def batch(dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=gen).to(dtype)


def loss_and_grads(sae: MatryoshkaBatchTopKSAE, x: torch.Tensor, dead_tokens: int):
    sae.zero_grad(set_to_none=True)
    loss, metrics = sae.loss(x, aux_alpha=1 / 32, dead_tokens=dead_tokens)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("core", [0, 6])
@pytest.mark.parametrize(
    "budget,mode", [("dynamic", "relu"), ("fixed", "relu"), ("dynamic", "batchtopk")]
)
def test_codes_and_nested_reconstructions_match(core, budget, mode):
    fast, ref = make_pair(core, budget, mode=mode)
    x = batch()
    codes = fast.encode_sparse(x)
    enc = ref.encode_train(x)
    torch.testing.assert_close(codes.to_dense(), enc.f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(codes.core_l0, enc.core_l0)
    torch.testing.assert_close(codes.min_selected, enc.min_selected)
    levels = fast.sparse_levels(codes)
    recons = torch.stack(ref.nested_reconstructions(enc.f), dim=1)
    assert levels.shape == recons.shape == (N, len(fast.groups), D)
    torch.testing.assert_close(levels, recons, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("core", [0, 6])
@pytest.mark.parametrize("dead", [False, True], ids=["no-dead", "aux-k"])
@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu-budget", "device-budget"])
@pytest.mark.parametrize("mode", MODES)
def test_loss_metrics_and_gradients_match(core, dead, sync_free, mode):
    fast, ref = make_pair(core, bias_level=core > 0, mode=mode)
    fast.sync_free_budget = sync_free  # True: the accelerator route (static top-k + rank mask)
    if dead:
        for sae in (fast, ref):  # a third of the latents dead: aux-k runs on them
            sae.tokens_since_fired[::3] = 10**9
    x = batch()
    loss_f, met_f, grads_f = loss_and_grads(fast, x, dead_tokens=1000)
    loss_r, met_r, grads_r = loss_and_grads(ref, x, dead_tokens=1000)
    if dead:
        assert float(met_r["aux_loss"]) > 0
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-10, atol=1e-12)
    for key, value in met_r.items():
        torch.testing.assert_close(met_f[key], value, rtol=1e-10, atol=1e-12, msg=key)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-8, atol=1e-10, msg=name)
    assert torch.equal(fast.tokens_since_fired, ref.tokens_since_fired)


@pytest.mark.parametrize("mode", MODES)
def test_float32_gradients_match_within_float_tolerance(mode):
    fast, ref = make_pair(6, dtype=torch.float32, mode=mode)
    x = batch(torch.float32)
    loss_f, _, grads_f = loss_and_grads(fast, x, dead_tokens=10**7)
    loss_r, _, grads_r = loss_and_grads(ref, x, dead_tokens=10**7)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_single_group_matches(mode):
    fast, ref = make_pair(6, fracs=[1.0], mode=mode)
    x = batch()
    loss_f, _, grads_f = loss_and_grads(fast, x, dead_tokens=10**7)
    loss_r, _, grads_r = loss_and_grads(ref, x, dead_tokens=10**7)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-10, atol=1e-12)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_runs_and_agrees_with_the_reference_under_autocast(mode):
    # What --device cuda runs: the sparse products stay fp32 inside, the GEMMs go bf16. bf16
    # ties can swap a few selected latents, hence the loose tolerance.
    fast, ref = make_pair(6, dtype=torch.float32, mode=mode)
    x = batch(torch.float32)
    losses = []
    for sae in (fast, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, metrics = sae.loss(x, aux_alpha=1 / 32, dead_tokens=10**7)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_training_steps_track_the_reference(mode):
    fast, ref = make_pair(6, mode=mode)
    cfg = SAEConfig(width=WIDTH, k=K, threshold_start_step=0, dead_tokens=10**7)
    train = TrainConfig(tokens_per_cycle=N * 5, batch_size=N, lr=1e-3, warmup_steps=0)
    trainers = [SAETrainer(s, cfg, train) for s in (fast, ref)]
    for step in range(5):
        x = batch(seed=10 + step)
        out_f, out_r = (t.step(x) for t in trainers)
        torch.testing.assert_close(out_f["loss"], out_r["loss"], rtol=1e-8, atol=1e-10)
    for (name, p_f), p_r in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(p_f, p_r, rtol=1e-8, atol=1e-10, msg=name)


def test_a_competing_core_shares_the_budget_and_the_threshold():
    shared, ref = make_pair(6, mode="batchtopk")
    relu, _ = make_pair(6, mode="relu")
    with torch.no_grad():  # a core that fires on nearly every token as a plain ReLU
        for sae in (shared, ref, relu):
            sae.b_enc[:6] = 6.0
    x = batch()
    codes = shared.encode_sparse(x)
    f = codes.to_dense().detach()
    assert int((f > 0).sum()) == K * N  # the total L0 is exactly k per token ...
    # ... and the core gets only the firings it wins, not all it would have as a ReLU
    assert float(codes.core_l0) < float(relu.encode_sparse(x).core_l0) - 0.5
    assert float(codes.min_selected) == float(f[f > 0].min())  # the core's values count too
    threshold = float(codes.min_selected) + 1e-3
    for sae in (ref, relu):
        sae.threshold.fill_(threshold)
    inf = ref.encode(x)
    assert ((inf[:, :6] == 0) | (inf[:, :6] > threshold)).all()  # the core obeys it
    assert (relu.encode(x)[:, :6] > 0).float().mean() > 0.9  # a relu core ignores it


def test_zero_budget_gives_no_non_core_codes():
    fast, ref = make_pair(6)
    fast.k = ref.k = 0  # the core alone; the non-core budget is empty
    x = batch()
    codes = fast.encode_sparse(x)
    assert codes.vals.numel() == 0 and float(codes.min_selected) == -1
    loss_f, met_f, _ = loss_and_grads(fast, x, dead_tokens=10**7)
    loss_r, met_r, _ = loss_and_grads(ref, x, dead_tokens=10**7)
    torch.testing.assert_close(loss_f, loss_r)
    torch.testing.assert_close(met_f["l0"], met_r["l0"])


def test_threshold_update_is_the_ema_and_ignores_empty_batches():
    sae, _ = make_pair(0, dtype=torch.float32)
    sae.update_threshold(torch.tensor(-1.0), 0.9)
    assert float(sae.threshold) == -1  # nothing selected yet: still unset
    sae.update_threshold(torch.tensor(2.0), 0.9)
    assert float(sae.threshold) == 2
    sae.update_threshold(torch.tensor(1.0), 0.9)
    assert abs(float(sae.threshold) - 1.9) < 1e-6
    sae.update_threshold(torch.tensor(-1.0), 0.9)
    assert abs(float(sae.threshold) - 1.9) < 1e-6
