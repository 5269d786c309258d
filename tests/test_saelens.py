"""The SAELens artefact reproduces our SAE on raw activations (JumpReLU formula)."""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from dmsae_ray.algo.core import Core, build_sae
from dmsae_ray.config import validate
from dmsae_ray.run.saelens import write_saelens


@pytest.mark.parametrize("core_activation", ["relu", "batchtopk"])
def test_saelens_jumprelu_matches_our_inference_on_raw_activations(
    tiny_dir, tmp_path, core_activation
):
    cfg = validate(tiny_config(
        tiny_dir, tmp_path / "r", model={"layer": 2}, sae={"core_activation": core_activation}
    ))
    torch.manual_seed(0)
    core = Core(torch.randn(64, 5), [(0, i) for i in range(5)], torch.zeros(5))
    sae = build_sae(cfg, 64, cycle=1, core=core)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.normal_()
    sae.threshold.fill_(0.3)
    nf = 7.5
    write_saelens(tmp_path / "sae", sae, cfg, 1, [(0, i) for i in range(5)], nf)
    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert meta["architecture"] == "jumprelu" and meta["d_sae"] == 256 and meta["d_in"] == 64
    assert meta["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert meta["metadata"]["hf_hook_name"] == "model.layers.2"
    assert meta["metadata"]["training_architecture_details"]["core_size"] == 5
    details = meta["metadata"]["training_architecture_details"]
    assert details["core_activation"] == core_activation
    # A relu core is exempt from the threshold; a competing core obeys the shared one.
    core_threshold = 0.0 if core_activation == "relu" else 0.3 * nf
    assert torch.allclose(w["threshold"][:5], torch.tensor(core_threshold))
    assert torch.allclose(w["threshold"][5:], torch.tensor(0.3 * nf))

    x = torch.randn(32, 64) * nf
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = torch.relu(pre) * (pre > w["threshold"])
    theirs = acts @ w["W_dec"] + w["b_dec"]
    ours = sae.decode(sae.encode(x / nf)) * nf
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acts, sae.encode(x / nf) * nf, atol=1e-4, rtol=1e-4)
