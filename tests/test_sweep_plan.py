"""Sweep planning without Ray (dmsae_ray/run/sweep_plan.py): bad grids and invalid `sweep:`
sections are refused before anything runs, naming the field; random knobs are sampled
reproducibly. Running a plan on Ray Tune: test_tuning.py."""

from __future__ import annotations

import time

import pytest
import yaml
from sweep_configs import base_config

from dmsae_ray import cli
from dmsae_ray.config import ConfigError, validate
from dmsae_ray.run.sweep_plan import SweepError, SweepSpec, load_sweep, plan_sweep


@pytest.mark.parametrize(
    "args, field",
    [
        (["--grid", "sae.kk=8,16"], "sweep.grid.sae.kk: unknown config key"),
        (["--tau", "0.5,1.5"], "sweep.grid.distill.tau: 1.5 is invalid"),
        (["--tau", ""], "sweep.grid.distill.tau: empty list"),
        ([], "sweep: empty search space"),
        (["--grid", "run_dir=a,b"], "sweep.grid.run_dir"),
        (["--k", "8,300"], "sweep.grid.sae.k: 300 is invalid"),
        (["--tau", "0.5", "--num-samples", "0"], "sweep.num_samples"),
    ],
)
def test_invalid_grid_is_refused_before_anything_runs(
    tiny_dir, tmp_path, capsys, args, field
):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_dir, tmp_path)))
    sweep_dir = tmp_path / "never"
    t0 = time.time()
    code = cli.main(["sweep", "--config", str(config), "--sweep-dir", str(sweep_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and "invalid sweep" in err and field in err, err
    assert not sweep_dir.exists() and time.time() - t0 < 30


def test_invalid_sweep_section_names_the_field(tiny_dir, tmp_path):
    config = tmp_path / "base.yaml"
    cfg = base_config(tiny_dir, tmp_path)
    cfg["sweep"] = {
        "grid": {"distill": {"tau": [0.5, 1.5]}, "sae.k": []},
        "random": {"train.lr": {"loguniform": [0, 1]}, "train.nope": {"choice": [1]}},
    }
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SweepError) as exc:
        load_sweep(config, sweep_dir=tmp_path / "never")
    fields = {".".join(loc) for loc, _ in exc.value.errors}
    assert fields == {
        "sweep.grid.distill.tau", "sweep.grid.sae.k", "sweep.random.train.lr",
        "sweep.random.train.nope",
    }
    assert isinstance(exc.value, ConfigError) and not (tmp_path / "never").exists()
    cfg["sweep"] = {"gird": {"distill.tau": [0.5]}}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SweepError, match="sweep.gird: unknown sweep option"):
        load_sweep(config)


def test_random_knobs_are_sampled_reproducibly(tiny_dir, tmp_path):
    base = validate(base_config(tiny_dir, tmp_path))
    spec = SweepSpec(
        grid={"distill.tau": [0.5, 0.9]},
        random={"train.lr": {"loguniform": [1e-4, 1e-2]}, "attribution.pooling": {
            "choice": ["quantile", "mean"]}},
        num_samples=3,
    )
    a = plan_sweep(base, spec, tmp_path / "s")
    b = plan_sweep(base, spec, tmp_path / "s")
    assert [t.name for t in a.trials] == [t.name for t in b.trials] and len(a.trials) == 6
    assert all(1e-4 <= t.params["train.lr"] <= 1e-2 for t in a.trials)
    # a grid that grows keeps the earlier points' draws, hence their finished runs
    grown = plan_sweep(
        base, spec.model_copy(update={"grid": {"distill.tau": [0.5, 0.9, 0.7]}}), tmp_path / "s"
    )
    assert {t.name for t in a.trials} <= {t.name for t in grown.trials}
    assert all(t.config.run_dir == str(tmp_path / "s" / "trials" / t.name) for t in a.trials)
