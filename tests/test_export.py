"""`dmsae export`: SAELens folders that SAELens itself loads and that reconstruct like ours.

The SAELens checks need the optional `sae-lens` package (`pip install -e ".[saelens]"`, which
`scripts/setup.sh` installs); without it they are skipped and only the files are checked.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from shared_runs import finished_core_run

from dmsae_ray import cli
from dmsae_ray.algo.evaluate import log_sparsity
from dmsae_ray.config import validate
from dmsae_ray.model.data import load_token_data, valid_mask
from dmsae_ray.model.lm import layer_activations
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.tools.export import export_run


@pytest.fixture(scope="module")
def core_run(tiny_dir, tmp_path_factory):
    return finished_core_run(tiny_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def raw_acts(core_run, tiny_lm):
    """Raw (unnormalised) layer activations of the run's eval blocks."""
    model, tok = tiny_lm
    cfg = validate(json.loads((core_run / "config.json").read_text()))
    data = load_token_data(cfg.data, tok)
    h = layer_activations(model, data.eval, cfg.model.layer)
    return h[valid_mask(data.eval, data.specials)].float()


@pytest.fixture(scope="module")
def exported(core_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "final"
    (entry,) = export_run(core_run, out, cycle="final", log=lambda s: None)
    return out, entry


def test_export_writes_a_complete_saelens_folder(core_run, exported):
    out, entry = exported
    rd = RunDir(core_run)
    last = len(rd.load_state()["cycles"]) - 1
    assert entry.cycle == last and entry.path == out
    cfg = json.loads((out / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 256
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["hf_hook_name"] == "model.layers.1" and meta["context_size"] == 64
    details = meta["training_architecture_details"]
    sae = rd.load_sae(last)
    assert details["cycle"] == last and details["core_size"] == sae.c
    assert details["selected_core"]["ids"] == rd.load_core(last)["ids"]
    assert set(details["eval"]) >= {"l0", "explained_variance", "kl_div_score"}
    w = load_file(str(out / "sae_weights.safetensors"))
    assert (w["threshold"][: sae.c] == 0).all()
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (256,) and sparsity.min() >= -10 - 1e-4 and sparsity.max() <= 0
    # log10(density + 1e-10) of a fresh eval pass: its L0 is the summed density.
    density = 10 ** sparsity.double() - 1e-10
    assert float(density.sum()) == pytest.approx(details["eval"]["l0"], rel=1e-4)
    torch.testing.assert_close(log_sparsity(density.float()), sparsity, atol=1e-4, rtol=0)


def test_saelens_loads_the_export_and_reconstructs_like_ours(core_run, exported, raw_acts):
    sae_lens = pytest.importorskip("sae_lens", reason="optional: pip install -e '.[saelens]'")
    out, entry = exported
    theirs = sae_lens.SAE.load_from_disk(out)
    ours = RunDir(core_run).load_sae(entry.cycle).eval()
    nf = RunDir(core_run).load_state()["norm_factor"]
    x = raw_acts
    with torch.no_grad():
        acts = theirs.encode(x)
        recon = theirs.decode(acts)
        ref_acts = ours.encode(x / nf) * nf
        ref = ours.decode(ours.encode(x / nf)) * nf
    torch.testing.assert_close(acts, ref_acts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(recon, ref, atol=1e-4, rtol=1e-4)
    assert (acts > 0).sum(-1).float().mean() > 0  # the test would be empty otherwise


def test_hub_layout_is_loadable_by_sae_id(core_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub"
    args = ["export", str(core_run), "--cycle", "all", "--out", str(out), "--hub-layout",
            "--repo-id", "me/dmsae-tiny"]
    assert cli.main(args) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n")
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in folders] == [f"layer_1_width_256_k8_cycle{c}" for c in range(3)]
    for p in folders:
        assert {f.name for f in p.iterdir()} == {
            "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
        }
        assert f"`{p.name}`" in card
    assert 'SAE.from_pretrained("me/dmsae-tiny", "layer_1_width_256_k8_cycle0")' in card

    sae_lens = pytest.importorskip("sae_lens", reason="optional: pip install -e '.[saelens]'")
    from sae_lens.loading import pretrained_sae_loaders

    def local_hub(repo_id, filename, **_):  # the hub, served from the exported folder
        assert repo_id == "me/dmsae-tiny"
        return str(out / filename)

    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", local_hub)
    sae, cfg, sparsity = sae_lens.SAE.from_pretrained_with_cfg_and_sparsity(
        "me/dmsae-tiny", folders[1].name
    )
    ref = load_file(str(folders[1] / "sae_weights.safetensors"))
    torch.testing.assert_close(sae.W_enc.detach(), ref["W_enc"])
    torch.testing.assert_close(
        sparsity, load_file(str(folders[1] / "sparsity.safetensors"))["sparsity"]
    )
    assert cfg["metadata"]["training_architecture_details"]["cycle"] == 1


def test_export_without_sparsity_needs_no_lm_and_rejects_bad_cycles(core_run, tmp_path, capsys):
    assert cli.main(["export", str(core_run), "--cycle", "0", "--out", str(tmp_path / "c0"),
                     "--no-sparsity"]) == 0
    assert not (tmp_path / "c0" / "sparsity.safetensors").exists()
    assert (tmp_path / "c0" / "cfg.json").is_file()
    assert cli.main(["export", str(core_run), "--cycle", "9", "--out", str(tmp_path / "x")]) == 2
    assert "cycles 0..2" in capsys.readouterr().err


def test_export_without_sparsity_carries_the_cycles_saved_metrics(core_run, tmp_path):
    out = tmp_path / "nosparsity"
    export_run(core_run, out, cycle="final", sparsity=False)
    details = json.loads((out / "cfg.json").read_text())["metadata"][
        "training_architecture_details"
    ]
    saved = RunDir(core_run).load_state()["cycles"][-1]["eval"]
    assert details["eval"]["l0"] == saved["l0"] and details["eval"]["fve"] == saved["fve"]
    assert not (out / "sparsity.safetensors").exists()
