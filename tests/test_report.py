"""`dmsae report` renders every plot and the summary. `dmsae inspect`: test_inspect_latents.py."""

import json

import pytest
from shared_runs import finished_core_run

from dmsae_ray import cli
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
