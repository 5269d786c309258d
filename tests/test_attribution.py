import torch

from dmsae_ray.algo.attribution import (
    attribute,
    attribution_scores,
    column_quantile,
    scored_mask,
    signed_to_pooled_input,
    spliced_loss,
)
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import AttributionConfig
from dmsae_ray.model.data import special_ids, valid_mask
from dmsae_ray.model.lm import layer_activations, replace_layer_output

LAYER = 1


def _setup(tiny_lm, core=3):
    model, tok = tiny_lm
    torch.manual_seed(0)
    d = model.config.hidden_size
    sae = MatryoshkaBatchTopKSAE(d, 128, 8, core_size=core, group_fractions=[0.25, 0.75])
    if core:
        sae.set_core(
            torch.randn(d, core) * 0.3,
            torch.zeros(core, dtype=torch.long),
            torch.arange(core),
            tied=False,
        )
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    sae.threshold.fill_(0.02)
    ids = torch.randint(3, tok.vocab_size, (2, 16))
    ids[:, 0] = tok.bos_token_id
    ids[1, 9] = tok.bos_token_id  # a document boundary mid-block
    return model, sae, ids, special_ids(tok)


def _norm(model, ids):
    h = layer_activations(model, ids, LAYER)
    return float(h.pow(2).sum(-1).mean().sqrt())


def test_error_term_splice_reproduces_clean_logits(tiny_lm):
    model, sae, ids, specials = _setup(tiny_lm)
    clean = model(input_ids=ids).logits
    nf = _norm(model, ids)
    logits = {}

    def capture(mode):
        box = {}
        orig = model.forward

        def fwd(*a, **k):
            out = orig(*a, **k)
            box["logits"] = out.logits
            return out

        model.forward = fwd
        try:
            spliced_loss(model, sae, ids, LAYER, nf, specials, mode)
        finally:
            del model.forward
        return box["logits"]

    logits["error_term"] = capture("error_term")
    logits["splice"] = capture("splice")
    torch.testing.assert_close(logits["error_term"], clean, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits["splice"], clean, atol=1e-3)
    # the splice hook is removed afterwards: the model is clean again
    torch.testing.assert_close(model(input_ids=ids).logits, clean)


def test_scores_match_autograd_and_finite_differences(tiny_lm):
    model, sae, ids, specials = _setup(tiny_lm)
    nf = _norm(model, ids)
    s = attribution_scores(model, sae, ids, LAYER, nf, specials, "splice")
    loss, f, valid = spliced_loss(model, sae, ids, LAYER, nf, specials, "splice")
    scored = scored_mask(valid)
    assert s.shape == (int(scored.sum()), sae.nested_width)
    assert not valid[:, 0].any() and not valid[1, 9]
    # pooled: positions with a next-token target; not the last one, not the one before a BOS
    assert not scored[:, -1].any() and not scored[1, 8] and scored[0, 1:-1].all()
    (grad_f,) = torch.autograd.grad(loss, f)
    full = f.detach() * grad_f
    torch.testing.assert_close(s, full[scored])
    assert (full[:, -1] == 0).all()  # the last position feeds no loss term: its zeros are left out

    n = sae.nested_width
    # finite differences: pick the active (token, latent) with the largest score
    flat = s.abs().argmax()
    tok_i, lat = divmod(int(flat), n)
    pos = torch.nonzero(scored)[tok_i]
    eps = 1e-3
    f0 = f.detach()

    def loss_with(delta: float) -> float:
        fd = f0.clone()
        fd[pos[0], pos[1], lat] += delta
        x0 = fd @ sae.W_dec[:n].detach() + sae.b_dec.detach()
        vm = valid_mask(ids, specials)

        def rep(h):
            return torch.where(vm[..., None], x0 * nf, h)

        with torch.no_grad(), replace_layer_output(model, LAYER, rep):
            logits = model(input_ids=ids).logits.double()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        )
        return float((nll * vm[:, 1:].flatten()).sum())

    fd_grad = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    assert abs(fd_grad - float(grad_f[pos[0], pos[1], lat])) < 1e-2 * max(1.0, abs(fd_grad))


def test_pooling_quantile_and_sign():
    torch.manual_seed(0)
    v = torch.randn(1000, 7).abs()
    torch.testing.assert_close(column_quantile(v, 0.99), torch.quantile(v, 0.99, dim=0))
    torch.testing.assert_close(column_quantile(v, 0.5), torch.quantile(v, 0.5, dim=0))
    s = torch.tensor([[1.0, -2.0]])
    assert signed_to_pooled_input(s, "abs").tolist() == [[1.0, 2.0]]
    assert signed_to_pooled_input(s, "helpful_only").tolist() == [[0.0, 2.0]]


def test_attribute_pools_over_batches(tiny_lm):
    model, sae, ids, specials = _setup(tiny_lm)
    nf = _norm(model, ids)
    blocks = torch.cat([ids, ids.flip(0)])
    cfg = AttributionConfig(batch_size=2, pooling="mean")
    pooled = attribute(model, sae, blocks, LAYER, nf, specials, cfg, log=None)
    s = torch.cat(
        [attribution_scores(model, sae, b, LAYER, nf, specials) for b in (ids, ids.flip(0))]
    )
    torch.testing.assert_close(pooled, s.abs().mean(0))
    assert pooled.shape == (sae.nested_width,) and (pooled >= 0).all() and pooled.sum() > 0
