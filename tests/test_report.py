"""`dmsae report` renders every plot and the summary; `dmsae inspect` finds top contexts."""

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
from dmsae_ray.tools.report import build_report
from dmsae_ray.tools.transfer import METRICS, VARIANTS, write_table

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def core_run(tiny_dir, tmp_path_factory):
    return finished_core_run(tiny_dir, tmp_path_factory)


def fake_transfer_rows() -> list[dict]:
    rows = []
    for seed in (0, 1):
        for k in (4, 8, 16):
            for n, variant in enumerate(VARIANTS):
                row = {"k": k, "variant": variant, "seed": seed,
                       "core_size": 0 if variant == "baseline" else 5}
                row |= {m: k * (1 + 0.1 * n) + seed if m == "l0" else 0.1 * n + k / 100
                        for m in METRICS}
                rows.append(row | {"run_dir": f"k{k}/{variant}/seed{seed}"})
    return rows


def test_report_renders_every_plot_with_a_transfer_table(core_run, tmp_path):
    table = tmp_path / "transfer"
    write_table(fake_transfer_rows(), table, core_run, 5)
    files = build_report(core_run, transfer=table / "transfer.csv", out=tmp_path / "report")
    plots = {k: v for k, v in files.items() if k != "summary"}
    assert set(plots) == {
        "core_size", "jaccard", "core_origins", "core_composition", "cycle_metrics",
        "feature_density", "transfer_metrics", "core_density",
    }
    for path in plots.values():
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == PNG
    summary = files["summary"].read_text()
    for path in plots.values():
        assert f"]({path.name})" in summary
    assert "## Final core" in summary and "| 2 |" in summary  # a row per cycle
    assert "Distilled minus baseline at the same measured L0" in summary  # table embedded
    distilled = json.loads((core_run / "core" / "core.json").read_text())
    assert f"## Final core: {len(distilled['ids'])} latents" in summary


def test_report_cli_writes_into_the_run_directory(core_run, capsys):
    assert cli.main(["report", str(core_run)]) == 0
    out = core_run / "report"
    assert (out / "summary.md").is_file()
    for name in ("core_size", "jaccard", "core_origins", "core_composition", "cycle_metrics",
                 "feature_density"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "No transfer table yet" in (out / "summary.md").read_text()
    assert "summary.md" in capsys.readouterr().out


def test_bad_report_input_is_one_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


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
