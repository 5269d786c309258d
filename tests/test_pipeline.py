"""The cycle loop in one process on the tiny model: run directory, resume, bad input."""

import json

import pytest
from conftest import tiny_config
from safetensors.torch import load_file

from dmsae_ray.config import ConfigError, validate
from dmsae_ray.run import local_backend, pipeline
from dmsae_ray.run.rundir import RunDir


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "full"
    lines = []
    state = pipeline.run(validate(tiny_config(tiny_dir, run_dir)), log=lines.append)
    return run_dir, state, lines


def test_run_writes_the_run_directory(finished_run):
    run_dir, state, lines = finished_run
    assert state["status"] == "completed" and state["cycle"] == 3
    assert json.loads((run_dir / "config.json").read_text())["sae"]["width"] == 256
    for c in range(3):
        cdir = run_dir / "cycles" / f"{c:03d}"
        for name in (
            "cfg.json",
            "sae_weights.safetensors",
            "metrics.json",
            "dmsae_state.safetensors",
        ):
            assert (cdir / "sae" / name).is_file()
        core = json.loads((cdir / "core.json").read_text())
        assert len(core["ids"]) == len(core["scores"]) == len(core["indices"])
        assert core["fraction"] >= 0.9 - 1e-9
        assert len(core["candidate_scores"]) == len(core["candidate_ids"])
        assert core["scores"] == sorted(core["scores"], reverse=True)
        enc = load_file(str(cdir / "core_encoder.safetensors"))["W_enc_core"]
        assert enc.shape[1] == len(core["ids"])
    # per cycle: core size, Jaccard, L0, FVE are printed
    summaries = [line for line in lines if "jaccard" in line]
    assert len(summaries) == 3 and all("L0" in s and "FVE" in s for s in summaries)
    distilled = json.loads((run_dir / "core" / "core.json").read_text())
    assert len(distilled["core_size_per_cycle"]) == 3
    assert distilled["ids"] == json.loads((run_dir / "cycles/002/core.json").read_text())["ids"]
    assert all(n >= 1 for n in distilled["selection_counts"])


def test_core_transfers_bit_identical_between_cycles(finished_run):
    run_dir, _, _ = finished_run
    rd = RunDir(run_dir)
    for c in (1, 2):
        prev_core = rd.load_core_encoder(c - 1)
        sae = rd.load_sae(c)
        assert sae.c == prev_core.shape[1]
        assert (sae.W_enc_core == prev_core).all()
        ids = [
            list(p)
            for p in zip(
                sae.origin_cycle[: sae.c].tolist(), sae.origin_index[: sae.c].tolist(), strict=True
            )
        ]
        assert ids == rd.load_core(c - 1)["ids"]


def test_resume_after_a_failure_keeps_committed_cycles(
    tiny_dir, tmp_path, monkeypatch, finished_run
):
    run_dir = tmp_path / "resumed"
    cfg = validate(tiny_config(tiny_dir, run_dir))
    real = local_backend.evaluate_sae

    def failing(model, sae, *a, **k):
        if sae.origin_cycle.max() >= 1:
            raise RuntimeError("injected failure in cycle 1")
        return real(model, sae, *a, **k)

    monkeypatch.setattr(local_backend, "evaluate_sae", failing)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run(cfg, log=lambda s: None)
    state = RunDir(run_dir).load_state()
    assert state["status"] == "failed" and state["cycle"] == 1 and "injected" in state["error"]
    assert not (run_dir / "cycles" / "001").exists()  # nothing half-written
    first = (run_dir / "cycles/000/core.json").stat().st_mtime_ns

    monkeypatch.setattr(local_backend, "evaluate_sae", real)
    lines = []
    state = pipeline.run(cfg, log=lines.append)
    assert state["status"] == "completed"
    assert any("resuming" in line for line in lines)
    assert not any("[cycle 0]" in line for line in lines)  # cycle 0 was not recomputed
    assert (run_dir / "cycles/000/core.json").stat().st_mtime_ns == first
    full_dir, _, _ = finished_run
    ours = json.loads((run_dir / "core/core.json").read_text())["ids"]
    assert ours == json.loads((full_dir / "core/core.json").read_text())["ids"]
    # a finished run is not redone
    assert pipeline.run(cfg, log=lines.append)["status"] == "completed"


def test_bad_input_fails_before_anything_is_written(tiny_dir, tmp_path):
    run_dir = tmp_path / "bad"
    cfg = validate(tiny_config(tiny_dir, run_dir, model={"layer": 9}))
    with pytest.raises(ConfigError, match=r"model.layer: must be in \[0, 3\]"):
        pipeline.run(cfg)
    assert not run_dir.exists()
    cfg = validate(tiny_config(tiny_dir, run_dir, model={"name": str(tmp_path / "no-model")}))
    with pytest.raises(FileNotFoundError, match="model.name"):
        pipeline.run(cfg)
    assert not run_dir.exists()
    cfg = validate(tiny_config(tiny_dir, run_dir, data={"dataset": str(tmp_path / "x.jsonl")}))
    with pytest.raises(FileNotFoundError, match="data.dataset"):
        pipeline.run(cfg)
    assert not run_dir.exists()


def test_changed_config_on_an_existing_run_is_refused(tiny_dir, finished_run):
    run_dir, _, _ = finished_run
    cfg = validate(tiny_config(tiny_dir, run_dir, distill={"tau": 0.5}))
    with pytest.raises(ConfigError, match="distill.tau"):
        pipeline.run(cfg)


def test_core_wider_than_the_sae_is_rejected(tiny_dir, finished_run, tmp_path):
    core_run, _, _ = finished_run
    n = len(json.loads((core_run / "core" / "core.json").read_text())["ids"])
    cfg = validate(
        tiny_config(
            tiny_dir,
            tmp_path / "w",
            sae={"width": n + 2, "k": 1},
            distill={"init_core": str(core_run), "cycles": 0},
        )
    )
    with pytest.raises(ConfigError, match="sae.width"):
        pipeline.run(cfg)
    assert not (tmp_path / "w").exists()


def test_runs_sharing_an_activation_cache_compute_it_once(tiny_dir, tmp_path):
    cache = tmp_path / "acts"
    data = {"activation_cache": str(cache)}
    states, logs = [], []
    for name, seed in (("a", 0), ("b", 1)):
        lines: list[str] = []
        cfg = tiny_config(tiny_dir, tmp_path / name, data=data, train={"seed": seed},
                          distill={"cycles": 0})
        states.append(pipeline.run(validate(cfg), log=lines.append))
        logs.append(lines)
    files = list(cache.glob("*/COMMIT.json"))
    assert len(files) == 1 and not list(cache.rglob("*.tmp"))
    assert len([p for p in files[0].parent.iterdir() if p.is_dir()]) == 1  # one attempt
    assert not any("reusing cached activations" in line for line in logs[0])
    assert any(f"reusing cached activations at {files[0].parent}" in line for line in logs[1])
    assert all(s["status"] == "completed" for s in states)
    # a different token budget is a different cache
    cfg = tiny_config(tiny_dir, tmp_path / "c", data=data, train={"tokens_per_cycle": 2048},
                      distill={"cycles": 0})
    pipeline.run(validate(cfg), log=lambda _: None)
    assert len(list(cache.glob("*/COMMIT.json"))) == 2


def test_an_object_store_cache_is_refused_without_ray(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path / "run", data={"activation_cache": "s3://bucket/acts"})
    with pytest.raises(ConfigError, match="must be a local directory"):
        pipeline.run(validate(cfg), log=lambda _: None)
