import pytest
import torch

from dmsae_ray.model.lm import (
    decoder_layers,
    layer_activations,
    layer_activations_full,
    replace_layer_output,
)


def _ids(tok, n=3, t=24):
    torch.manual_seed(0)
    ids = torch.randint(3, tok.vocab_size, (n, t))
    ids[:, 0] = tok.bos_token_id
    return ids


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hook_site_is_hidden_states_l_plus_1(tiny_lm, layer):
    model, tok = tiny_lm
    ids = _ids(tok)
    full = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    fast = layer_activations(model, ids, layer)
    torch.testing.assert_close(fast, full)
    torch.testing.assert_close(layer_activations_full(model, ids, layer), full)


def test_fast_path_stops_after_the_layer(tiny_lm):
    model, tok = tiny_lm
    seen = []
    handles = [
        layer.register_forward_hook(lambda m, i, o, n=n: seen.append(n))
        for n, layer in enumerate(decoder_layers(model))
    ]
    try:
        layer_activations(model, _ids(tok), 1)
    finally:
        for h in handles:
            h.remove()
    assert seen == [0, 1]


def test_replace_layer_output_changes_the_logits_and_is_removed(tiny_lm):
    model, tok = tiny_lm
    ids = _ids(tok)
    clean = model(input_ids=ids).logits
    with replace_layer_output(model, 1, lambda h: torch.zeros_like(h)):
        ablated = model(input_ids=ids).logits
    assert not torch.allclose(clean, ablated)
    with replace_layer_output(model, 1, lambda h: h):
        identity = model(input_ids=ids).logits
    torch.testing.assert_close(identity, clean)
    torch.testing.assert_close(model(input_ids=ids).logits, clean)  # hook removed
