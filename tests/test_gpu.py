"""The CUDA paths: what only a GPU runs, checked against the CPU or the dense reference.

On CUDA the fast path takes routes the CPU suite never exercises: the sync-free dynamic budget
(static top-k plus a rank mask), the plain device top-k, cuSPARSE for the CSR products and the
SDDMM, bf16 autocast around the GEMMs, fused Adam and pinned-memory copies. Without CUDA every
test here is skipped, unless ``DMSAE_TEST_DEVICE`` names a device: ``bench/gpu_check.sh
--dry-run`` sets it to ``cpu`` so these checks run (trivially, CPU against CPU) in CI and never
rot, and ``bench/gpu_check.sh`` sets it to ``cuda`` so a missing GPU fails instead of skipping.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from test_fast_path import N, batch, loss_and_grads, make_pair

from dmsae_ray.algo.attribution import attribute
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.algo.trainer import SAETrainer
from dmsae_ray.config import AttributionConfig, SAEConfig, TrainConfig
from dmsae_ray.model.lm import layer_activations

DEVICE = os.environ.get("DMSAE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DEVICE, reason="needs CUDA (or DMSAE_TEST_DEVICE=cpu for a dry run)"),
]
FRACS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]
# (loss rtol, loss atol, grad rtol, grad atol): fp64 is exact up to summation order; fp32 as
# tests/test_fast_path.py's float32 test.
TOL = {
    torch.float64: (1e-10, 1e-12, 1e-8, 1e-10),
    torch.float32: (1e-5, 1e-6, 1e-4, 1e-5),
}


def device_type() -> str:
    return torch.device(DEVICE).type


def build_pair(core: int, dtype: torch.dtype, **kwargs) -> tuple:
    """The fast SAE and its dense reference copy on the device under test. Every SAE option a
    test parametrises over (``core_activation``, say) goes through here as a keyword."""
    fast, ref = make_pair(core, dtype=dtype, **kwargs)
    return fast.to(DEVICE), ref.to(DEVICE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: under bf16 a few entries can be far off while the tensor is close."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dead", [False, True], ids=["no-dead", "aux-k"])
@pytest.mark.parametrize("core", [0, 6], ids=["no-core", "frozen-core"])
def test_fast_path_matches_reference_on_device(core, dead, dtype):
    fast, ref = build_pair(core, dtype, bias_level=core > 0)
    if dead:
        for sae in (fast, ref):  # a third of the latents dead: aux-k runs on them
            sae.tokens_since_fired[::3] = 10**9
    x = batch(dtype).to(DEVICE)
    loss_f, met_f, grads_f = loss_and_grads(fast, x, dead_tokens=1000)
    loss_r, met_r, grads_r = loss_and_grads(ref, x, dead_tokens=1000)
    assert loss_f.device.type == device_type()
    if dead:
        assert float(met_r["aux_loss"]) > 0
    l_rtol, l_atol, g_rtol, g_atol = TOL[dtype]
    torch.testing.assert_close(loss_f, loss_r, rtol=l_rtol, atol=l_atol)
    for key, value in met_r.items():
        torch.testing.assert_close(met_f[key], value, rtol=l_rtol, atol=l_atol, msg=key)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_f[name], g, rtol=g_rtol, atol=g_atol, msg=name)
    assert torch.equal(fast.tokens_since_fired, ref.tokens_since_fired)


def bf16_loss_and_grads(sae: MatryoshkaBatchTopKSAE, x: torch.Tensor) -> tuple:
    sae.zero_grad(set_to_none=True)
    with torch.autocast(device_type(), dtype=torch.bfloat16):
        loss, metrics = sae.loss(x, aux_alpha=1 / 32, dead_tokens=10**7)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in sae.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    return loss.detach().float(), metrics, grads


@pytest.mark.parametrize("core", [0, 6], ids=["no-core", "frozen-core"])
def test_bf16_autocast_fast_path_is_as_accurate_as_the_reference(core):
    # Under autocast the GEMMs run in bf16 (the sparse products stay fp32), and bf16 rounds
    # the pre-activations into ties that each path breaks its own way (the fast path adds the
    # bias inside the GEMM, before rounding): a few of the k*B selected latents differ, and
    # those move whole gradient rows. So both bf16 paths are measured against the fp64 truth,
    # over six batches (one batch's error swings by 2x with its few swaps), and the fast path
    # must be about as close to it as the dense reference is: on the CPU its mean error was
    # 1.0-1.6x the reference's (~10%), and a wrong product would be off by O(1).
    fast, ref = build_pair(core, torch.float32, bias_level=core > 0)
    truth = copy.deepcopy(ref).double()
    core_before = fast.W_enc_core.clone()
    errs: dict[str, dict[str, list[float]]] = {"fast": {}, "ref": {}}
    seeds = range(1, 7)
    for seed in seeds:
        x = batch(torch.float32, seed=seed).to(DEVICE)
        loss_t, _, grads_t = loss_and_grads(truth, x.double(), dead_tokens=10**7)
        with torch.no_grad(), torch.autocast(device_type(), dtype=torch.bfloat16):
            picked_f = fast.encode_sparse(x).to_dense() > 0
            picked_r = ref.encode_train(x).f > 0
        assert float((picked_f & picked_r).sum() / picked_r.sum()) > 0.95
        for name, sae in (("fast", fast), ("ref", ref)):
            loss, metrics, grads = bf16_loss_and_grads(sae, x)
            torch.testing.assert_close(loss.double(), loss_t, rtol=2e-2, atol=1e-4)
            for key, g in grads_t.items():
                errs[name].setdefault(key, []).append(rel_err(grads[key], g))
    for key in errs["ref"]:
        assert max(errs["fast"][key]) < 0.4, (key, errs["fast"][key])
        fast_err = sum(errs["fast"][key]) / len(seeds)
        ref_err = sum(errs["ref"][key]) / len(seeds)
        assert fast_err < 2 * ref_err + 0.02, (key, fast_err, ref_err)
    assert torch.equal(fast.W_enc_core, core_before)  # the frozen core stays frozen


def trainer_pair(device: str) -> tuple[MatryoshkaBatchTopKSAE, SAETrainer]:
    fast, _ = make_pair(6, dtype=torch.float32)
    sae = fast.to(device)
    cfg = SAEConfig(width=sae.width, k=sae.k, threshold_start_step=0, dead_tokens=10**7)
    train = TrainConfig(tokens_per_cycle=N * 10, batch_size=N, lr=1e-3, warmup_steps=0)
    return sae, SAETrainer(sae, cfg, train)


def test_trainer_steps_on_device_match_the_cpu():
    sae_d, trainer_d = trainer_pair(DEVICE)
    sae_c, trainer_c = trainer_pair("cpu")
    if device_type() == "cuda":
        assert trainer_d.opt.param_groups[0]["fused"] is True  # one fused Adam kernel
    core = sae_c.W_enc_core.clone()
    for step in range(3):
        x = batch(torch.float32, seed=20 + step)
        # The training loop's copy: pinned host memory, non-blocking (trainer docstring).
        x_d = x.pin_memory() if device_type() == "cuda" else x
        out_d = trainer_d.step(x_d.to(DEVICE, non_blocking=True))
        out_c = trainer_c.step(x)
        # Metrics stay on the device (the loop syncs only when it logs).
        assert out_d["loss"].device.type == device_type()
        torch.testing.assert_close(out_d["loss"].cpu(), out_c["loss"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out_d["l0"].cpu(), out_c["l0"], rtol=1e-4, atol=1e-4)
    for (name, p_d), p_c in zip(
        sae_d.state_dict().items(), sae_c.state_dict().values(), strict=True
    ):
        # Three Adam steps amplify fp32 rounding differences of the two kernels' sums.
        torch.testing.assert_close(p_d.cpu(), p_c, rtol=1e-3, atol=1e-4, msg=name)
    norms = sae_d.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae_d.W_enc_core.cpu(), core)  # frozen on the device too
    assert float(sae_d.threshold) > 0


def test_trainer_step_under_bf16_autocast_on_device():
    # bench/sae_step.py --device cuda times this: the step wrapped in bf16 autocast.
    sae, trainer = trainer_pair(DEVICE)
    before = sae.W_dec.detach().clone()
    for step in range(2):
        x = batch(torch.float32, seed=30 + step).to(DEVICE)
        with torch.autocast(device_type(), dtype=torch.bfloat16):
            out = trainer.step(x)
        assert torch.isfinite(out["loss"]).all()
    assert all(p.dtype == torch.float32 for p in sae.parameters())  # master weights stay fp32
    assert not torch.equal(sae.W_dec.detach(), before)


# -- attribution on the tiny Gemma-2 -------------------------------------------------------------
LAYER = 1


def attribution_setup(tiny_lm) -> tuple:
    model, tok = tiny_lm
    d = int(model.config.hidden_size)
    specials = [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id]
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(3, int(model.config.vocab_size), (8, 32), generator=gen)
    blocks[:, 0] = tok.bos_token_id
    h = layer_activations(model, blocks, LAYER).float()
    norm = float(h.pow(2).sum(-1).mean().sqrt())
    torch.manual_seed(4)
    sae = MatryoshkaBatchTopKSAE(d, 256, 8, 4, group_fractions=FRACS)
    cols = torch.randn(d, 4) / math.sqrt(d)
    sae.set_core(cols, torch.zeros(4, dtype=torch.long), torch.arange(4), tied=True)
    with torch.no_grad():
        # A learned threshold: the per-token JumpReLU encoding, so a latent's code does not
        # hinge on a batch-wide top-k that a last-bit difference could reorder.
        sae.threshold.fill_(0.02)
    return model, sae.eval(), blocks, norm, specials


def test_attribution_on_device_matches_the_cpu(tiny_lm):
    model, sae, blocks, norm, specials = attribution_setup(tiny_lm)
    cfg = AttributionConfig(batch_size=4)
    ref = attribute(model, sae, blocks, LAYER, norm, specials, cfg, log=None)
    model_d = copy.deepcopy(model).to(DEVICE)  # the session-wide fixture stays on the CPU
    got = attribute(
        model_d, copy.deepcopy(sae).to(DEVICE), blocks, LAYER, norm, specials, cfg, log=None
    )
    assert got.shape == ref.shape == (sae.nested_width,) and got.device.type == "cpu"
    assert float(ref.max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * float(ref.max()))


def test_attribution_with_a_bf16_model_on_device(tiny_lm):
    # model.dtype auto is bf16 on a GPU: the splice runs the SAE in fp32 and casts back.
    model, sae, blocks, norm, specials = attribution_setup(tiny_lm)
    cfg = AttributionConfig(batch_size=4)
    ref = attribute(model, sae, blocks, LAYER, norm, specials, cfg, log=None)
    model_d = copy.deepcopy(model).to(DEVICE, torch.bfloat16)
    got = attribute(
        model_d, copy.deepcopy(sae).to(DEVICE), blocks, LAYER, norm, specials, cfg, log=None
    )
    assert torch.isfinite(got).all()
    cos = float(torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=0))
    assert cos > 0.95, cos
