"""dmsae_ray/run/rundir.py: the config check on resume, one cycle written all or nothing, the SAE
and core round trips, and RunState."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dmsae_ray.algo.core import Core
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import ConfigError, MissingInputError, validate
from dmsae_ray.run import rundir as rundir_mod
from dmsae_ray.run.rundir import RunDir, RunState


def small_cfg(run_dir, **sections):
    data = {
        "model": {"name": "tiny", "layer": 1, "dtype": "float32"},
        "data": {"dataset": "corpus.jsonl", "context_length": 16},
        "sae": {"width": 32, "k": 4},
        "train": {"tokens_per_cycle": 256, "batch_size": 64},
        "ray": {"enabled": False},
        "run_dir": str(run_dir),
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return validate(data)


def trained_looking_sae(core_size=3, cycle=1):
    """An SAE whose every tensor differs from a fresh one: core, ids, threshold, counters."""
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKSAE(
        8, 32, 4, core_size, group_fractions=[0.25, 0.75], core_activation="batchtopk",
        cycle=cycle,
    )
    with torch.no_grad():
        sae.set_core(
            torch.randn(8, core_size), torch.zeros(core_size, dtype=torch.long),
            torch.tensor([5, 2, 9][:core_size]), tied=False, bias=torch.randn(core_size),
        )
        sae.b_dec.copy_(torch.randn(8))
        sae.b_enc.add_(torch.randn(32))
        sae.threshold.fill_(0.37)
        sae.tokens_since_fired.copy_(torch.arange(32))
    return sae


def write_cycle(rd, cycle, sae, cfg, metrics=None):
    core = Core.of(sae, [4, 0])
    rd.save_cycle(
        cycle, sae, cfg, norm_factor=2.5, core_in=[], core_out={"ids": core.ids, "scores": [1, 2]},
        core=core, metrics=metrics or {"cycle": cycle}
    )
    return core


# ----------------------------------------------------------------------------- config


def test_init_writes_the_config_and_accepts_the_same_one_again(tmp_path):
    rd = RunDir(tmp_path / "run")
    cfg = small_cfg(rd.root)
    assert rd.init(cfg) == cfg
    assert validate(json.loads(rd.config_path.read_text())) == cfg
    assert rd.init(small_cfg(rd.root)) == cfg


def test_init_refuses_a_changed_config_and_names_the_field(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.init(small_cfg(rd.root))
    with pytest.raises(ConfigError, match=r"sae\.k: stored 4, given 6"):
        rd.init(small_cfg(rd.root, sae={"k": 6}))
    with pytest.raises(ConfigError, match=r"train\.lr: stored 0\.0003, given 0\.01"):
        rd.init(small_cfg(rd.root, train={"lr": 0.01}))
    with pytest.raises(ConfigError, match=r"sae\.group_fractions"):
        rd.init(small_cfg(rd.root, sae={"group_fractions": [0.5, 0.5]}))
    # The refused configs changed nothing on disk.
    assert validate(json.loads(rd.config_path.read_text())) == small_cfg(rd.root)


def test_init_accepts_a_changed_ray_section_and_stores_it(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.init(small_cfg(rd.root))
    moved = small_cfg(rd.root, ray={"enabled": True, "num_workers": 2})
    assert rd.init(moved) == moved
    assert validate(json.loads(rd.config_path.read_text())).ray == moved.ray
    # Where the run directory is named from is not what the run computes either.
    elsewhere = small_cfg(tmp_path / "alias", ray={"enabled": True, "num_workers": 2})
    assert rd.init(elsewhere) == elsewhere


# ----------------------------------------------------------------------------- cycles


def test_save_cycle_writes_every_file_and_no_temp_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    cfg = small_cfg(rd.root)
    sae = trained_looking_sae()
    write_cycle(rd, 0, sae, cfg, metrics={"cycle": 0, "eval": {"fve": 0.9}})
    d = rd.cycle_dir(0)
    assert d == rd.root / "cycles" / "000"
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert files == [
        "core.json", "core_encoder.safetensors", "sae/cfg.json", "sae/dmsae_hparams.json",
        "sae/dmsae_state.safetensors", "sae/metrics.json", "sae/sae_weights.safetensors",
    ]
    assert [p.name for p in (rd.root / "cycles").iterdir()] == ["000"]
    assert json.loads((d / "sae" / "metrics.json").read_text())["eval"] == {"fve": 0.9}


def test_save_cycle_replaces_a_leftover_directory(tmp_path):
    rd = RunDir(tmp_path / "run")
    leftover = rd.cycle_dir(2)
    leftover.mkdir(parents=True)
    (leftover / "stale.txt").write_text("from a killed attempt")
    write_cycle(rd, 2, trained_looking_sae(), small_cfg(rd.root))
    assert not (leftover / "stale.txt").exists()
    assert (leftover / "core.json").is_file()
    assert [p.name for p in (rd.root / "cycles").iterdir()] == ["002"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_cycle_leaves_nothing_behind(tmp_path, monkeypatch, error):
    rd = RunDir(tmp_path / "run")
    sae = trained_looking_sae()

    def fail(path, core):
        raise error

    monkeypatch.setattr(rundir_mod, "_save_core_tensors", fail)  # the last file of the cycle
    with pytest.raises(type(error)):
        write_cycle(rd, 0, sae, small_cfg(rd.root))
    assert list((rd.root / "cycles").iterdir()) == []  # no cycles/000, no hidden .000.* copy


def test_load_sae_round_trips_the_whole_state(tmp_path):
    rd = RunDir(tmp_path / "run")
    sae = trained_looking_sae()
    write_cycle(rd, 1, sae, small_cfg(rd.root))
    back = rd.load_sae(1)
    assert back.hparams() == sae.hparams()
    assert back.groups == sae.groups
    want, got = sae.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    x = torch.randn(5, 8)
    assert torch.equal(back.encode(x), sae.eval().encode(x))


def test_cycle_core_round_trips_vectors_ids_and_bias(tmp_path):
    rd = RunDir(tmp_path / "run")
    sae = trained_looking_sae()
    core = write_cycle(rd, 0, sae, small_cfg(rd.root))
    back = rd.load_cycle_core(0)
    assert back.ids == core.ids == [(1, 4), (0, 5)]  # persistent ids, tuples again
    assert torch.equal(back.vectors, core.vectors) and torch.equal(back.bias, core.bias)
    assert torch.equal(rd.load_core_encoder(0), core.vectors)
    assert rd.load_core(0)["scores"] == [1, 2]


def test_distilled_core_round_trip(tmp_path):
    rd = RunDir(tmp_path / "run")
    with pytest.raises(MissingInputError, match="no distilled core"):
        rd.load_distilled_core()
    core = Core(torch.randn(8, 3), [(0, 1), (2, 7), (1, 0)], torch.tensor([0.5, -1.0, 2.0]))
    rd.save_distilled_core(core, {"ids": [list(i) for i in core.ids], "size": 3})
    back, summary = rd.load_distilled_core()
    assert summary == {"ids": [[0, 1], [2, 7], [1, 0]], "size": 3}
    assert back.ids == core.ids
    assert torch.equal(back.vectors, core.vectors) and torch.equal(back.bias, core.bias)
    assert sorted(p.name for p in rd.core_dir.iterdir()) == ["core.json", "encoder.safetensors"]


def test_a_core_written_before_biases_loads_with_zero_bias(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.core_dir.mkdir(parents=True)
    vectors = torch.randn(8, 2, dtype=torch.float64)
    save_file({"W_enc_core": vectors}, str(rd.core_dir / "encoder.safetensors"))
    (rd.core_dir / "core.json").write_text(json.dumps({"ids": [[0, 3], [0, 1]]}))
    core, _ = rd.load_distilled_core()
    assert torch.equal(core.vectors, vectors)
    assert core.bias.dtype == torch.float64 and torch.equal(core.bias, torch.zeros(2).double())


# ----------------------------------------------------------------------------- RunState


def test_run_state_starts_fresh_and_persists_every_change(tmp_path):
    rd = RunDir(tmp_path / "run")
    state = RunState(rd)
    assert state.get()["status"] == "created" and state.get()["cycle"] == 0
    assert not rd.state_path.exists()  # "created" is never written on its own
    rd.root.mkdir()
    state.update(status="running", norm_factor=3.0)
    on_disk = json.loads(rd.state_path.read_text())
    assert on_disk["status"] == "running" and on_disk["norm_factor"] == 3.0
    assert "updated" in on_disk
    assert RunState(rd).get() == on_disk  # a restart reads it back


def test_set_progress_merges_and_computes_rate_and_eta(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    now = [1000.0]
    monkeypatch.setattr(rundir_mod.time, "time", lambda: now[0])
    state = RunState(rd)
    state.set_stage("train", cycle=0, tokens_total=2000)
    assert state.get()["stage"] == "train"
    assert state.get()["progress"] == {"cycle": 0, "tokens_total": 2000, "stage_started": 1000.0}
    now[0] = 1010.0
    p = state.set_progress(tokens_done=500)["progress"]
    assert p["cycle"] == 0 and p["tokens_total"] == 2000 and p["stage_started"] == 1000.0
    assert p["tokens_per_s"] == 50.0 and p["eta_s"] == 30.0
    now[0] = 1050.0
    p = state.set_progress(tokens_done=2500)["progress"]  # past the total: ETA 0, not negative
    assert p["tokens_per_s"] == 50.0 and p["eta_s"] == 0.0
    assert json.loads(rd.state_path.read_text())["progress"] == p


def test_set_progress_without_a_total_has_no_rate(tmp_path):
    state = RunState(RunDir(tmp_path))
    state.set_stage("evaluate", cycle=1)
    p = state.set_progress(batches=3)["progress"]
    assert p["batches"] == 3 and "tokens_per_s" not in p and "eta_s" not in p
    state.set_stage("train", tokens_total=100)
    assert "tokens_per_s" not in state.set_progress(tokens_done=0)["progress"]


def test_commit_cycle_is_idempotent_and_refuses_out_of_order(tmp_path):
    rd = RunDir(tmp_path)
    state = RunState(rd)
    state.set_stage("attribute", cycle=0)
    s = state.commit_cycle({"cycle": 0, "core_size": 5})
    assert s["cycle"] == 1 and s["stage"] == "committed" and s["progress"] == {}
    assert s["cycles"] == [{"cycle": 0, "core_size": 5}]
    again = state.commit_cycle({"cycle": 0, "core_size": 99})  # a retried call
    assert again["cycles"] == [{"cycle": 0, "core_size": 5}] and again["cycle"] == 1
    with pytest.raises(ValueError, match="commit of cycle 2, expected 1"):
        state.commit_cycle({"cycle": 2})
    state.commit_cycle({"cycle": 1, "core_size": 4})
    on_disk = RunState(rd).get()
    assert on_disk["cycle"] == 2 and [c["cycle"] for c in on_disk["cycles"]] == [0, 1]
