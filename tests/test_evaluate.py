"""SAEBench core metric formulas against hand-computed values, and the eval pass on the tiny LM."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from dmsae_ray.algo.core import Core, build_sae
from dmsae_ray.algo.evaluate import (
    CoreStats,
    ce_loss_score,
    density_histogram,
    density_metrics,
    evaluate_sae,
    kl_div_score,
    l0_overflow,
    log_sparsity,
    max_cosine_sims,
    reconstruction_metrics,
    run_eval,
    token_ce_kl,
)
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import validate
from dmsae_ray.model.data import load_token_data, valid_mask
from dmsae_ray.model.lm import layer_activations, replace_layer_output

approx = pytest.approx


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    nested = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    f = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])  # latent 0 is the core
    m = reconstruction_metrics(x, x_hat, f, core=1, x_hat_nested=nested)
    assert m["l0"] == approx(1.5) and m["core_l0"] == approx(0.5) and m["l1"] == approx(3.0)
    # squared error per token: 1 and 1; mean x = (0.5, 1); ||x - mean||^2 = 1.25 for both
    assert m["mse"] == approx(1.0)
    assert m["fve"] == approx(1 - 1 / 1.25)
    assert m["explained_variance_legacy"] == approx(1 - 1 / 1.25)
    # SAEBench's code: E||x||^2 - (mean_d E[x_d^2])^2 = 2.5 - 1.25^2 = 0.9375
    assert m["explained_variance"] == approx(1 - 1 / 0.9375)
    assert m["nested_mse"] == approx(2.0)  # errors 0 and 4
    assert m["nested_fve"] == approx(1 - 2 / 1.25)
    assert m["cossim"] == approx((1 / math.sqrt(2) + 1) / 2)
    assert m["l2_norm_in"] == approx(1.5) and m["l2_norm_out"] == approx((math.sqrt(2) + 3) / 2)
    assert m["l2_ratio"] == approx((math.sqrt(2) + 1.5) / 2)
    # E||x_hat||^2 / E<x, x_hat> = ((2 + 9) / 2) / ((1 + 6) / 2)
    assert m["relative_reconstruction_bias"] == approx(11 / 7)
    # densities 0.5, 0, 1
    assert m["frac_alive"] == approx(2 / 3) and m["core_frac_alive"] == approx(1.0)


def test_legacy_explained_variance_is_a_per_token_mean():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # mean 4/3: per-token variance 16/9, 1/9, 25/9
    x_hat = torch.tensor([[1.0], [1.0], [2.0]])  # squared errors 1, 0, 1
    m = reconstruction_metrics(x, x_hat, torch.ones(3, 1), core=0)
    assert m["fve"] == approx(1 - (2 / 3) / (14 / 9))
    assert m["explained_variance_legacy"] == approx((7 / 16 + 1 + 16 / 25) / 3)


def test_saebench_metrics_are_raw_scale_and_per_batch_where_saebench_is():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    f = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    # The SAE sees x / 2: every metric is of the raw activations 2x (SAEBench's view).
    m = reconstruction_metrics(x, x_hat, f, core=1, scale=2.0)
    assert m["mse"] == approx(4.0) and m["l1"] == approx(6.0) and m["l2_norm_in"] == approx(3.0)
    # E||2x||^2 - (mean_d E[(2x_d)^2])^2 = 10 - 5^2: SAEBench's formula is not scale-free ...
    assert m["explained_variance"] == approx(1 - 4 / (10 - 25))
    assert m["fve"] == approx(1 - 1 / 1.25)  # ... ours is
    # Two eval batches of different sizes: SAEBench averages these two per batch.
    stats = CoreStats(3, core=1)
    stats.update(x[:1], x_hat[:1], f[:1])
    stats.update(torch.cat([x[1:], x[1:]]), torch.cat([x_hat[1:], x_hat[1:]]), f[[1, 1]])
    m = stats.metrics()
    assert m["relative_reconstruction_bias"] == approx((2 / 1 + 9 / 6) / 2)
    # batch means: ||x||^2 1 and 4, x_d^2 per dim (1, 0) and (0, 4), rss 1 and 1
    assert m["explained_variance"] == approx(1 - 1 / (2.5 - 1.25**2))
    assert m["mse"] == approx(1.0)  # a per-token mean over all three tokens


def test_max_cosine_sims_and_l0_overflow_by_hand():
    v = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # columns at 0, 45 and 90 degrees
    torch.testing.assert_close(
        max_cosine_sims(v, chunk=2), torch.tensor([0.5**0.5, 0.5**0.5, 0.5**0.5])
    )
    sae = MatryoshkaBatchTopKSAE(2, 8, k=2, core_size=3, group_fractions=[1.0])
    assert l0_overflow(sae, 3.5) == approx(1.5) and l0_overflow(sae, 1.0) == 0.0
    shared = MatryoshkaBatchTopKSAE(2, 8, 2, 3, [1.0], core_activation="batchtopk")
    assert l0_overflow(shared, 3.5) == 0.0  # a competing core cannot overflow the budget


def test_density_metrics_by_hand():
    d = torch.tensor([0.0, 0.005, 0.02, 0.2])
    m = density_metrics(d)
    assert m["frac_alive"] == approx(0.75)
    assert m["freq_over_1_percent"] == approx(0.5)
    assert m["freq_over_10_percent"] == approx(0.25)
    assert m["normalized_freq_over_1_percent"] == approx(0.22 / 0.225)
    assert m["normalized_freq_over_10_percent"] == approx(0.2 / 0.225)
    torch.testing.assert_close(log_sparsity(d), torch.log10(d + 1e-10))
    hist = density_histogram(d)
    assert sum(hist["counts"]) == 4 and hist["counts"][0] == 1  # the dead latent: log10 = -10
    assert len(hist["counts"]) == len(hist["log10_edges"]) - 1
    # log10 0.005 = -2.3 -> bin [-2.5, -2); 0.02 -> [-2, -1.5); 0.2 -> [-1, -0.5)
    edges = hist["log10_edges"]
    for value in (0.005, 0.02, 0.2):
        i = max(j for j, e in enumerate(edges[:-1]) if e <= math.log10(value))
        assert hist["counts"][i] >= 1


def test_ce_and_kl_per_token_by_hand():
    clean = torch.zeros(1, 2, 2)  # uniform over a 2-token vocabulary at both positions
    new = torch.tensor([[[math.log(3.0), 0.0], [math.log(3.0), 0.0]]])  # q = (3/4, 1/4)
    ids = torch.tensor([[0, 1]])
    ce, kl = token_ce_kl(clean, new, ids)
    assert ce.shape == (1, 1) and kl.shape == (1, 2)
    assert float(ce[0, 0]) == approx(math.log(4.0))  # -log q(token 1)
    # KL(p || q) = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.5 ln(4/3)
    torch.testing.assert_close(kl, torch.full((1, 2), 0.5 * math.log(4 / 3)))
    assert ce_loss_score(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0) == approx(0.75)
    assert kl_div_score(kl_sae=0.5, kl_zero=2.0) == approx(0.75)
    assert math.isnan(ce_loss_score(1.0, 1.0, 1.0)) and math.isnan(kl_div_score(0.1, 0.0))


def test_chunked_log_probs_match_the_unchunked_formula(monkeypatch):
    import dmsae_ray.algo.evaluate as ev

    torch.manual_seed(0)
    clean, new = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    ids = torch.randint(0, 5, (2, 7))
    monkeypatch.setattr(ev, "_LOGIT_CHUNK", 20)  # two positions per chunk
    ce, kl = token_ce_kl(clean, new, ids)
    ref_ce = F.cross_entropy(new[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    p = clean.softmax(-1)
    ref_kl = (p * (p.log() - new.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(ce.flatten(), ref_ce)
    torch.testing.assert_close(kl, ref_kl)


@pytest.fixture(scope="module")
def tiny_eval(tiny_dir, tiny_lm, tmp_path_factory):
    model, tok = tiny_lm
    cfg = validate(tiny_config(tiny_dir, tmp_path_factory.mktemp("ev") / "r"))
    data = load_token_data(cfg.data, tok)
    return model, data, cfg.model.layer


def identity_sae(d: int) -> MatryoshkaBatchTopKSAE:
    """f = (relu(x), relu(-x)), x_hat = relu(x) - relu(-x) = x: a perfect reconstruction."""
    sae = MatryoshkaBatchTopKSAE(d, 2 * d, k=1, group_fractions=[1.0])
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc_nc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.threshold.fill_(0.0)
    return sae.eval()


def test_a_perfect_sae_recovers_everything_on_the_tiny_lm(tiny_eval):
    model, data, layer = tiny_eval
    sae = identity_sae(model.config.hidden_size)
    m, density = run_eval(model, sae, data.eval, layer, 3.0, data.specials, batch_size=2)
    valid = valid_mask(data.eval, data.specials)
    assert m["eval_tokens"] == int(valid.sum()) and density.shape == (sae.width,)
    assert m["mse"] < 1e-10 and m["fve"] == approx(1.0) and m["explained_variance"] == approx(1.0)
    assert m["cossim"] == approx(1.0) and m["l2_ratio"] == approx(1.0)
    assert m["ce_sae"] == approx(m["ce_clean"], abs=1e-5)
    assert m["kl_sae"] < 1e-6 < m["kl_zero"]
    assert m["kl_div_score"] == approx(1.0, abs=1e-5)
    assert m["ce_loss_score"] == approx(1.0, abs=1e-3)
    # Every coordinate is non-zero on one side or the other: L0 = d, half of 2d per token.
    assert m["l0"] == approx(model.config.hidden_size, abs=0.5)
    assert density.sum() == approx(m["l0"], rel=1e-5)

    # CE means over positions whose *input* token is not special, zero-ablation zeroes all.
    ids = data.eval
    logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    mask = valid[:, :-1].flatten()
    assert m["ce_clean"] == approx(float(nll[mask].mean()), rel=1e-5)
    with replace_layer_output(model, layer, torch.zeros_like):
        zl = model(input_ids=ids).logits
    nll0 = F.cross_entropy(zl[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    assert m["ce_zero"] == approx(float(nll0[mask].mean()), rel=1e-5)


def test_evaluate_sae_uses_the_inference_threshold_and_counts_the_core(tiny_eval, tiny_dir):
    model, data, layer = tiny_eval
    cfg = validate(tiny_config(tiny_dir, "unused", sae={"width": 64, "k": 4}))
    d = model.config.hidden_size
    torch.manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(d, 3), dim=0)
    core = Core(vectors, [(0, i) for i in range(3)], torch.zeros(3))
    sae = build_sae(cfg, d, cycle=1, core=core).eval()
    sae.threshold.fill_(0.05)
    nf = 10.0
    # The signature local_backend and the Ray scoring actors call, positionally.
    m = evaluate_sae(model, sae, data.eval, layer, nf, data.specials, 2)
    h = layer_activations(model, data.eval, layer)[valid_mask(data.eval, data.specials)] / nf
    f = sae.encode(h)
    assert m["l0"] == approx(float((f > 0).sum(-1).float().mean()), rel=1e-5)
    assert m["core_l0"] == approx(float((f[:, :3] > 0).sum(-1).float().mean()), rel=1e-5)
    for key in ("kl_div_score", "ce_loss_score", "freq_over_1_percent", "feature_density_hist",
                "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim"):
        assert key in m
    assert m["average_max_decoder_cosine_sim"] == approx(float(max_cosine_sims(sae.W_dec.T).mean()))
