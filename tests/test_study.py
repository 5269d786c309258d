"""`dmsae study` on the tiny model: distil, transfer with seeds, report, in one directory."""

import json

import pytest
import yaml
from conftest import tiny_config

from dmsae_ray import cli
from dmsae_ray.config import ConfigError
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.tools.transfer import read_table


@pytest.fixture(scope="module")
def study(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = tiny_config(tiny_dir, root / "ignored", distill={"cycles": 1})
    del cfg["run_dir"]  # the study decides where its runs live
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = root / "out"
    argv = ["study", str(config), "--out", str(out), "--k", "6", "--seeds", "2"]
    assert cli.main(argv) == 0
    return config, out, argv


def test_the_study_directory_holds_distillation_transfer_and_report(study):
    _, out, _ = study
    state = RunDir(out / "distill").load_state()
    assert state["status"] == "completed" and len(state["cycles"]) == 2
    rows = read_table(out / "transfer" / "transfer.csv")
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, s) for v in ("distilled", "baseline", "random") for s in (0, 1)
    )
    assert all(r["k"] == 6 for r in rows)
    md = (out / "transfer" / "transfer.md").read_text()
    assert "at the same measured L0" in md
    report = out / "report"
    for name in ("summary.md", "core_density.png", "core_origins.png", "transfer_metrics.png"):
        assert (report / name).is_file(), name
    summary = (report / "summary.md").read_text()
    assert "| rank | id | attribution | times selected | density |" in summary
    record = json.loads((out / "study.json").read_text())
    assert record["ks"] == [6] and record["seeds"] == 2


def test_every_run_of_the_study_shares_one_activation_cache(study):
    _, out, _ = study
    assert len(list((out / "activations").glob("*/COMMIT.json"))) == 1
    for run in [out / "distill", *sorted((out / "transfer").glob("k6/*/seed*"))]:
        assert not (run / "activations").exists(), run


def test_core_densities_are_recorded_with_the_selection(study):
    _, out, _ = study
    core = RunDir(out / "distill").load_core(1)
    assert len(core["densities"]) == len(core["ids"])
    assert all(0 <= d <= 1 for d in core["densities"])


def test_a_rerun_resumes_instead_of_training_again(study, capsys):
    _, out, argv = study
    before = (out / "transfer" / "transfer.csv").read_text()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already completed") == 1 + 6
    assert (out / "transfer" / "transfer.csv").read_text() == before


def test_a_k_as_wide_as_the_sae_is_refused_before_any_work(study, tmp_path):
    config, _, _ = study
    with pytest.raises(ConfigError, match="smaller than sae.width"):
        from dmsae_ray.tools.study import run_study

        run_study(str(config), tmp_path / "x", [256])
    assert not (tmp_path / "x").exists()


def test_study_help_explains_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["study", "--help"])
    text = capsys.readouterr().out
    assert "OUT/transfer" in text and "measured" in text and "resum" in text.lower()
