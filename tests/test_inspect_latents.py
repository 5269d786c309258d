"""dmsae_ray/tools/inspect_latents.py: `dmsae inspect` finds the top-activating contexts of a
latent (persistent ids resolved, maxima checked against a fresh encoding of the eval tokens) on
the shared finished tiny run (tests/shared_runs.py)."""

import json
import math

import pytest
import torch
from shared_runs import finished_core_run

from dmsae_ray import cli
from dmsae_ray.model.data import load_token_data, valid_mask
from dmsae_ray.model.lm import layer_activations, load_tokenizer
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.tools.inspect_latents import encode_columns, inspect_latents, parse_latent


@pytest.fixture(scope="module")
def core_run(tiny_dir, tmp_path_factory):
    return finished_core_run(tiny_dir, tmp_path_factory)


def test_encode_columns_matches_the_full_inference_encoding(core_run):
    sae = RunDir(core_run).load_sae(2)
    assert float(sae.threshold) >= 0
    x = torch.randn(50, sae.d_in)
    cols = [0, 1, sae.c, sae.width - 1]
    torch.testing.assert_close(encode_columns(sae, x, cols), sae.encode(x)[:, cols])


def test_inspect_finds_the_top_contexts_of_a_latent(core_run, tiny_lm):
    rd = RunDir(core_run)
    sae = rd.load_sae(2)
    # A persistent id of a frozen core latent resolves to its index in this cycle's SAE.
    j = 1
    pid = f"{int(sae.origin_cycle[j])}:{int(sae.origin_index[j])}"
    assert parse_latent(pid, sae) == j and parse_latent("7", sae) == 7
    results = inspect_latents(core_run, [pid, "7"], cycle="final", top=3, window=4, source="eval")
    assert [r["index"] for r in results] == [j, 7]
    r = results[0]
    assert r["id"] == pid and r["frozen_core"] and r["times_selected"] >= 1
    values = [h["value"] for h in r["top"]]
    assert values == sorted(values, reverse=True) and 0 < len(values) <= 3
    # The reported maximum is the real maximum of the latent over the eval tokens.
    model, _ = tiny_lm
    cfg = json.loads((core_run / "config.json").read_text())
    nf = rd.load_state()["norm_factor"]
    from dmsae_ray.config import validate

    c = validate(cfg)
    data = load_token_data(c.data, load_tokenizer(c.model))
    h = layer_activations(model, data.eval, c.model.layer) / nf
    acts = sae.encode(h.flatten(0, 1))[:, j].view(h.shape[:2])
    acts[~valid_mask(data.eval, data.specials)] = 0
    assert values[0] == pytest.approx(float(acts.max()), rel=1e-4)
    top = r["top"][0]
    assert float(acts[top["block"], top["position"]]) == pytest.approx(values[0], rel=1e-4)
    assert f"[[{top['token']}]]" in top["text"]
    assert 0 < r["density"] <= 1 and not math.isnan(r["density"])


def test_inspect_cli_prints_the_distilled_core(core_run, capsys):
    assert cli.main(["inspect", str(core_run), "--top", "2", "--source", "eval"]) == 0
    out = capsys.readouterr().out
    distilled = json.loads((core_run / "core" / "core.json").read_text())
    assert out.count("latent ") >= len(distilled["ids"]) and "[[" in out
    assert cli.main(["inspect", str(core_run), "--latent", "9:9"]) == 2
    assert "not in this cycle's SAE" in capsys.readouterr().err
