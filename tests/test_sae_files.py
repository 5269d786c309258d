"""dmsae_ray/algo/sae_files.py: the one on-disk format of a trained SAE, written by a run
directory's cycles and by the Ray Train worker for the driver: the bit-exact round trip, the
directory written as a whole, and the run directory's ``sae/`` read by the same reader."""

from __future__ import annotations

import math

import pytest
import torch
from test_rundir import small_cfg, trained_looking_sae, write_cycle

from dmsae_ray.algo.sae_files import HPARAMS_FILE, METRICS_FILE, STATE_FILE, load_sae, save_sae
from dmsae_ray.run.rundir import RunDir

METRICS = {"loss": 0.1 + 0.2, "mse": 1 / 3, "l0": 8.0, "steps": 16, "resumed_from": 8}


def assert_same_sae(back, sae) -> None:
    assert back.hparams() == sae.hparams() and back.groups == sae.groups
    want, got = sae.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype, key
        assert torch.equal(want[key], got[key]), key


def test_round_trip_is_bit_exact_with_the_metrics(tmp_path):
    sae = trained_looking_sae()
    save_sae(tmp_path / "final", sae, METRICS)
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == sorted(
        [HPARAMS_FILE, METRICS_FILE, STATE_FILE]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary directory left
    back, metrics = load_sae(tmp_path / "final")
    assert_same_sae(back, sae)
    assert metrics == METRICS  # floats exactly: JSON keeps every bit of a double
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(back.eval().encode(x), sae.eval().encode(x))


def test_metrics_are_optional_and_not_finite_ones_survive(tmp_path):
    sae = trained_looking_sae(core_size=0, cycle=0)
    save_sae(tmp_path / "plain", sae)
    assert not (tmp_path / "plain" / METRICS_FILE).exists()
    back, metrics = load_sae(tmp_path / "plain")
    assert metrics is None
    assert_same_sae(back, sae)
    save_sae(tmp_path / "nan", sae, {"mse": float("nan"), "dead": math.inf})
    metrics = load_sae(tmp_path / "nan")[1]
    assert math.isnan(metrics["mse"]) and metrics["dead"] == math.inf


def test_an_existing_directory_is_replaced_as_a_whole(tmp_path):
    out = tmp_path / "final"
    out.mkdir()
    # a leftover of the format before sae_files.py: gone, not merged
    for name in ("sae.safetensors", "sae.json", METRICS_FILE):
        (out / name).write_text("old")
    sae = trained_looking_sae()
    save_sae(out, sae, {"steps": 1})
    assert sorted(p.name for p in out.iterdir()) == sorted([HPARAMS_FILE, METRICS_FILE, STATE_FILE])
    assert load_sae(out)[1] == {"steps": 1}


def test_a_failed_save_leaves_the_previous_directory_and_no_temporary_one(tmp_path):
    out = tmp_path / "final"
    sae = trained_looking_sae()
    save_sae(out, sae, {"steps": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TypeError):
        save_sae(out, trained_looking_sae(core_size=1), {"not json": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_directory_cycle_is_the_same_format(tmp_path):
    rd = RunDir(tmp_path / "run")
    sae = trained_looking_sae()
    write_cycle(rd, 1, sae, small_cfg(rd.root), metrics={"cycle": 1, "eval": {"fve": 0.9}})
    back, metrics = load_sae(rd.cycle_dir(1) / "sae")
    assert_same_sae(back, sae)
    assert metrics == {"cycle": 1, "eval": {"fve": 0.9}}
    assert_same_sae(rd.load_sae(1), sae)
    # the SAELens files of the cycle sit beside the format's own
    assert (rd.cycle_dir(1) / "sae" / "cfg.json").is_file()
