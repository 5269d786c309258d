"""The distillation on a real local Ray cluster: Ray Data -> Ray Train (2 gloo workers) ->
scoring actors -> coordinator; `dmsae run` submitted as a Ray job, its driver killed and the run
resumed; a worker failure inside training."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from conftest import tiny_config

from dmsae_ray.config import validate
from dmsae_ray.distributed.coordinator import NAMESPACE, coordinator_name
from dmsae_ray.distributed.training import FAULT_ENV
from dmsae_ray.run import pipeline
from dmsae_ray.run.rundir import RunDir

RAY = {"enabled": True, "num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1}


def ray_config(tiny_dir, run_dir, **sections):
    sections = {"ray": RAY} | sections
    return tiny_config(tiny_dir, run_dir, **sections)


@pytest.fixture(scope="module")
def ray_run(ray_head, tiny_dir, tmp_path_factory):
    """An uninterrupted run with two trainer workers: the end-to-end checks, and the reference
    the killed-driver and failed-worker runs must equal bit for bit. Two workers are bitwise
    reproducible here because the parquet cache fits ``train.epoch_cache_mb``
    (training.shard_by_block), so one run serves all three (each used to train its own)."""
    run_dir = tmp_path_factory.mktemp("ray") / "full"
    lines: list[str] = []
    cfg = ray_config(tiny_dir, run_dir, distill={"cycles": 1})
    state = pipeline.run(validate(cfg), log=lines.append)
    return run_dir, state, lines


def test_end_to_end_on_ray(ray_run):
    run_dir, state, lines = ray_run
    assert state["status"] == "completed" and state["cycle"] == 2
    assert len([ln for ln in lines if "jaccard" in ln]) == 2
    rd = RunDir(run_dir)
    for c in range(2):
        assert (rd.cycle_dir(c) / "sae" / "sae_weights.safetensors").is_file()
        summary = state["cycles"][c]
        assert summary["train"]["steps"] == 16 and summary["train"]["l0"] == pytest.approx(8, 0.1)
        assert 0 < summary["eval"]["fve"] <= 1
    # Ray Train wrote checkpoints for every cycle under the run directory
    assert all((run_dir / "ray_train" / f"cycle-{c:03d}").is_dir() for c in range(2))
    assert (run_dir / "tokens").is_dir() and (run_dir / "activations_parquet/COMMIT.json").is_file()
    # the frozen core came through Ray Train unchanged
    assert (rd.load_sae(1).W_enc_core == rd.load_core_encoder(0)).all()
    # the coordinator is gone once the run is over; its state is on disk
    with pytest.raises(ValueError):
        ray.get_actor(coordinator_name(run_dir), namespace=NAMESPACE)


def assert_quiet_log(text: str) -> list[str]:
    """The console of a run on Ray: each training progress line once (Ray Train's print patch
    wrote them twice), no TrainingReport(...) dumps. Returns the progress lines."""
    steps = re.findall(r"\[cycle \d+\] step \d+/\d+", text)
    assert len(steps) == len(set(steps)), steps
    assert "TrainingReport(" not in text
    return steps


def _drivers(config_path) -> list[int]:
    """The processes of a `dmsae run --config config_path` (a job's shell and its Python)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [p for p in pids if p != os.getpid() and f"--config {config_path}" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_ray_job_whose_driver_is_killed_resumes(ray_run, ray_head, tiny_dir, tmp_path):
    """`ray job submit -- dmsae run` (how a cluster runs it), its driver SIGKILLed during cycle
    1, then `dmsae run` again: cycle 0 is kept, cycle 1 redone, and the result equals the
    uninterrupted run's bit for bit."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    reference, ref_state, _ = ray_run
    run_dir = tmp_path / "killed"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(ray_config(tiny_dir, run_dir, distill={"cycles": 1})))
    client = JobSubmissionClient(ray_head["dashboard"])
    job = client.submit_job(entrypoint=f"dmsae run --config {path}")
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    state_path = run_dir / "state.json"
    deadline = time.time() + 600
    live = None
    while time.time() < deadline and client.get_job_status(job) not in ended:
        cycle = json.loads(state_path.read_text())["cycle"] if state_path.is_file() else 0
        if cycle == 1 and "[cycle 0] core" in client.get_job_logs(job):
            # cycle 0 is committed and cycle 1 runs: the coordinator answers while it does
            actor = ray.get_actor(coordinator_name(run_dir), namespace=NAMESPACE)
            live = ray.get(actor.get.remote(), timeout=30)
            break
        time.sleep(0.2)
    assert live is not None and live["status"] == "running" and live["cycle"] == 1, live
    drivers = _drivers(path)
    assert drivers, "no driver process of the job"
    for pid in drivers:  # no chance to clean up: a crashed driver
        os.kill(pid, signal.SIGKILL)
    while client.get_job_status(job) not in ended:
        assert time.time() < deadline, "the killed job did not end"
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.FAILED
    # The job's log: cycle 0's progress forwarded from the training worker once, no dumps
    logs = client.get_job_logs(job)
    assert "[cycle 0] core" in logs
    assert assert_quiet_log(logs)[0] == "[cycle 0] step 8/16"
    state = json.loads(state_path.read_text())
    assert state["cycle"] == 1 and state["status"] == "running"
    committed = (run_dir / "cycles/000/core.json").stat().st_mtime_ns

    env = os.environ | {"RAY_ADDRESS": ray_head["address"]}
    out = subprocess.run(
        [sys.executable, "-m", "dmsae_ray.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming" in out.stdout
    assert_quiet_log(out.stdout + out.stderr)
    assert "[cycle 0] core" not in out.stdout and "[cycle 1] core" in out.stdout
    assert (run_dir / "cycles/000/core.json").stat().st_mtime_ns == committed
    final = json.loads(state_path.read_text())
    assert final["status"] == "completed" and [s["cycle"] for s in final["cycles"]] == [0, 1]
    for c in range(2):  # the first cycle that differs, with what each run's training did
        ours = json.loads((run_dir / f"cycles/{c:03d}/core.json").read_text())
        theirs = json.loads((reference / f"cycles/{c:03d}/core.json").read_text())
        why = (c, final["cycles"][c]["train"], ref_state["cycles"][c]["train"])
        assert ours["candidate_scores"] == theirs["candidate_scores"], why
    ours = json.loads((run_dir / "core/core.json").read_text())
    theirs = json.loads((reference / "core/core.json").read_text())
    assert ours["history"] == theirs["history"]  # same cores as the uninterrupted run


def test_worker_failure_recovers_from_checkpoint(ray_run, tiny_dir, tmp_path, monkeypatch):
    reference, ref_state, _ = ray_run
    cfg = ray_config(
        tiny_dir, tmp_path / "faulty", distill={"cycles": 0}, train={"checkpoint_every": 8}
    )
    monkeypatch.setenv(FAULT_ENV, "12")
    state = pipeline.run(validate(cfg), log=lambda s: None)
    assert state["status"] == "completed"
    assert state["cycles"][0]["train"]["resumed_from"] == 8
    assert state["cycles"][0]["train"]["steps"] == 16
    assert ref_state["cycles"][0]["train"]["resumed_from"] == 0
    # Steps 9-16 after the restart trained on the batches 9-16 of the stream, not 1-8 again:
    # cycle 0 equals the uninterrupted run's (whose checkpoints fall elsewhere) bit for bit.
    ours = json.loads((tmp_path / "faulty/cycles/000/core.json").read_text())
    theirs = json.loads((reference / "cycles/000/core.json").read_text())
    assert ours["candidate_scores"] == theirs["candidate_scores"]
    assert ours["ids"] == theirs["ids"]


def test_missing_resources_fail_fast_naming_the_field(ray_head, tiny_dir, tmp_path):
    from dmsae_ray.config import ConfigError

    run_dir = tmp_path / "gpu"
    cfg = ray_config(tiny_dir, run_dir, ray=RAY | {"use_gpu": True, "resource_wait_s": 0})
    t0 = time.time()
    with pytest.raises(ConfigError, match="ray.use_gpu"):
        pipeline.run(validate(cfg))
    assert time.time() - t0 < 60 and not run_dir.exists()
    cfg = ray_config(tiny_dir, run_dir, ray=RAY | {"num_workers": 64, "resource_wait_s": 0})
    with pytest.raises(ConfigError, match="ray.num_workers"):
        pipeline.run(validate(cfg))
