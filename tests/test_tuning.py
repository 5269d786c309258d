"""Sweeps with real Ray Tune on the session's real local Ray cluster: a tau grid on the tiny
model finishes with a summary read back from its runs; a sweep resumes without rerunning
finished trials (outputs deleted; driver killed mid-way, Tune experiment restored); `POST
/v1/sweeps` runs a sweep as a Ray job. Planning without Ray (bad grids refused before anything
runs, random knobs sampled reproducibly): test_sweep_plan.py.

Trials run with `ray.enabled: false` (each distillation inside its Tune trial's process):
Tune, its trials and their reports are real; only the stages stay out of Ray Train, which
test_ray_pipeline.py covers."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from serving import TOKEN, Server, read_events, stop_leftover_jobs
from sweep_configs import base_config

from dmsae_ray.config import validate
from dmsae_ray.distributed.tuning import run_sweep
from dmsae_ray.run.sweep_plan import (
    PLOT_CORE,
    PLOT_JACCARD,
    SUMMARY_CSV,
    SUMMARY_JSON,
    SUMMARY_MD,
    SweepSpec,
    plan_sweep,
)

PNG = b"\x89PNG\r\n\x1a\n"
METRICS = ("core_size", "fraction", "jaccard")
EVAL = ("l0", "core_l0", "explained_variance", "ce_loss_score")


# 2^18 tokens per cycle: seconds per cycle where the tiny default takes a tenth of one.
SLOW_TRAIN = {"tokens_per_cycle": 2**18, "log_every": 500, "checkpoint_every": 1000}


def mtime(run_dir: Path, cycle: int = 0) -> int:
    return (run_dir / "cycles" / f"{cycle:03d}" / "core.json").stat().st_mtime_ns


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


@pytest.fixture(scope="module")
def grid_sweep(ray_head, tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    base = validate(base_config(tiny_dir, tmp))
    spec = SweepSpec(grid={"distill.tau": [0.5, 0.9], "sae.k": [8]}, max_concurrent_trials=2)
    plan = plan_sweep(base, spec, tmp / "tau")
    lines: list[str] = []
    t0 = time.time()
    outcome = run_sweep(plan, log=lines.append)
    return plan, outcome, lines, time.time() - t0


def test_grid_sweep_summary_comes_from_the_runs(grid_sweep):
    plan, outcome, lines, _ = grid_sweep
    assert outcome.ok and outcome.skipped == [] and len(outcome.launched) == 2
    assert outcome.experiment is not None and outcome.experiment.parent == plan.sweep_dir
    sweep_dir = plan.sweep_dir
    with open(sweep_dir / SUMMARY_CSV) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert sorted(float(r["distill.tau"]) for r in rows) == [0.5, 0.9]
    for row in rows:
        run_dir = sweep_dir / row["run_dir"]
        assert run_dir.parent == sweep_dir / "trials"
        state = state_of(run_dir)
        assert row["status"] == state["status"] == "completed"
        assert int(row["cycles"]) == len(state["cycles"]) == 2
        last = state["cycles"][-1]
        for key in METRICS:
            assert float(row[key]) == pytest.approx(last[key], rel=1e-9)
        for key in EVAL:
            assert float(row[key]) == pytest.approx(last["eval"][key], rel=1e-9)
        core = json.loads((run_dir / "core" / "core.json").read_text())
        every = set.intersection(*({tuple(i) for i in h} for h in core["history"]))
        assert int(row["selected_every_cycle"]) == len(every)
        assert int(row["sae.k"]) == 8 and json.loads((run_dir / "config.json").read_text())[
            "distill"]["tau"] == float(row["distill.tau"])
    # the smaller tau keeps the smaller (or equal) core
    by_tau = {float(r["distill.tau"]): int(r["core_size"]) for r in rows}
    assert by_tau[0.5] <= by_tau[0.9]
    summary = json.loads((sweep_dir / SUMMARY_JSON).read_text())
    assert summary["counts"] == {"completed": 2}
    assert all(len(c) == 2 for c in summary["cycles"].values())
    md = (sweep_dir / SUMMARY_MD).read_text()
    assert all(f"| {r['trial']} | {r['distill.tau']} | 8 | completed |" in md for r in rows)
    for plot in (PLOT_CORE, PLOT_JACCARD):
        assert (sweep_dir / plot).read_bytes()[:8] == PNG
    # Tune got one report per committed cycle, then the final one with the stability count
    for result in outcome.results:
        name = result.config["trial"]["name"]
        state = state_of(sweep_dir / "trials" / name)
        df = result.metrics_dataframe
        per_cycle = df[df["final"].isna()] if "final" in df else df
        assert list(per_cycle["cycle"]) == [0, 1]
        assert list(per_cycle["core_size"]) == [c["core_size"] for c in state["cycles"]]
        assert result.metrics["final"] == 1
        assert result.metrics["jaccard"] == pytest.approx(state["cycles"][1]["jaccard"])
        row = next(r for r in rows if r["trial"] == name)
        assert result.metrics["selected_every_cycle"] == int(row["selected_every_cycle"])
    assert any("2 to run" in ln for ln in lines)


def test_rerun_skips_finished_trials_and_redoes_deleted_ones(grid_sweep):
    plan, first, _, _ = grid_sweep
    kept, deleted = (t.run_dir for t in plan.trials)
    kept_mtime = mtime(kept)
    before = json.loads((plan.sweep_dir / SUMMARY_JSON).read_text())["rows"]
    shutil.rmtree(deleted)

    outcome = run_sweep(plan, log=lambda s: None)
    assert outcome.skipped == [kept.name] and outcome.launched == [deleted.name]
    assert mtime(kept) == kept_mtime  # not recomputed
    assert state_of(deleted)["status"] == "completed"
    redone = mtime(deleted)
    after = outcome.summary["rows"]
    assert [r["trial"] for r in after] == [r["trial"] for r in before]
    assert all(r["status"] == "completed" for r in after)
    # the redone trial is the same computation (seeded, one process): same core
    assert after[1]["core_size"] == before[1]["core_size"]

    # everything complete: nothing is launched at all, the summary is rewritten
    again = run_sweep(plan, log=lambda s: None)
    assert again.launched == [] and again.results is None and again.ok
    assert mtime(kept) == kept_mtime and mtime(deleted) == redone


def _started(trials: Path) -> dict[str, str]:
    """Trials whose run has begun (state.json written), with their status."""
    return {d.name: state_of(d)["status"] for d in trials.glob("*") if (d / "state.json").exists()}


def _kill_when(cmd: list[str], env: dict, ready: Callable[[], bool]) -> str:
    """Start the sweep CLI, SIGKILL it (no cleanup: a crashed driver) once ``ready()``."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )
    # Drain the output as it comes: a full pipe would block the driver.
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(10)
    out = "".join(chunks)
    assert alive and ready(), out[-4000:]
    return out


def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_head, tiny_dir, tmp_path):
    config = tmp_path / "base.yaml"
    # Cycles of a few seconds (the tiny default's take a tenth of one): "killed while the first
    # trial runs" must not race the trial's end.
    cfg = base_config(tiny_dir, tmp_path, train=SLOW_TRAIN)
    # One trial at a time: the second starts only once the first has completed, so "the
    # second has begun" is a deterministic moment to kill at.
    cfg["sweep"] = {"grid": {"distill.tau": [0.6, 0.8]}, "max_concurrent_trials": 1}
    config.write_text(yaml.safe_dump(cfg))
    sweep_dir = tmp_path / "killed"
    trials = sweep_dir / "trials"
    env = os.environ | {"RAY_ADDRESS": ray_head["address"]}
    cmd = [
        sys.executable, "-m", "dmsae_ray.cli", "sweep", "--config", str(config),
        "--sweep-dir", str(sweep_dir),
    ]

    # 1. killed while the first trial runs: nothing finished, the same two trials are open,
    #    so the rerun restores Tune's own experiment
    _kill_when(cmd, env, lambda: len(_started(trials)) == 1)
    assert "completed" not in _started(trials).values()
    time.sleep(2)  # the dead driver's trial actors are torn down by Ray
    # 2. the rerun is killed as soon as the second trial begins: the first is complete
    out = _kill_when(cmd, env, lambda: len(_started(trials)) == 2)
    assert "0 already complete, 2 to run" in out and "restoring the Tune experiment" in out
    status = _started(trials)
    (finished,) = (trials / n for n, s in status.items() if s == "completed")
    finished_mtime = mtime(finished)
    time.sleep(2)

    # 3. the next rerun launches only the unfinished trial
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-4000:]
    assert "1 already complete, 1 to run" in log
    assert mtime(finished) == finished_mtime  # not recomputed
    assert f"[{finished.name}]" not in log  # not even launched (no line of its trial)
    rows = list(csv.DictReader(open(sweep_dir / SUMMARY_CSV)))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    assert json.loads((sweep_dir / "state.json").read_text())["status"] == "completed"


def test_rest_sweeps_under_uvicorn(ray_head, tiny_dir, tmp_path):
    """Submit (idempotent, capped), stop after the first trial, resume without rerunning it,
    read the summary and artefacts, delete: the real app under uvicorn, sweeps as Ray jobs."""
    import httpx

    root = str(tiny_dir["root"])  # the tiny model and corpus are local: allow their directory
    server = Server(ray_head["dashboard"], tmp_path, "--max-active-sweeps", "1",
                    "--model-root", root, "--data-root", root)
    server.start()
    try:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        ) as api:
            _rest_sweep_lifecycle(api, tiny_dir, tmp_path)
    finally:
        server.stop()
        stop_leftover_jobs(ray_head["dashboard"])


def _rest_sweep_lifecycle(api, tiny_dir, tmp_path) -> None:
    import httpx

    def get(sweep_id: str) -> dict:
        r = api.get(f"/v1/sweeps/{sweep_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(sweep_id: str, pred, timeout: float = 400) -> dict:
        deadline = time.time() + timeout
        while not pred(view := get(sweep_id)):
            assert time.time() < deadline, view
            time.sleep(0.5)
        return view

    # Trials of a few seconds each, so that the sweep can be seen and stopped between them.
    body = base_config(tiny_dir, tmp_path, distill={"cycles": 2}, train=SLOW_TRAIN)
    body.pop("run_dir")
    body["sweep"] = {"grid": {"distill.tau": [0.5, 1.5]}}
    no_token = httpx.post(str(api.base_url.join("/v1/sweeps")), json=body, timeout=60)
    assert no_token.status_code == 401
    r = api.post("/v1/sweeps", json=body)
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["detail"]] == ["sweep.grid.distill.tau"]
    r = api.post("/v1/sweeps", json=body | {"sweep": {"grid": {"sae.kk": [1]}}})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "sweep.grid.sae.kk"
    r = api.post("/v1/sweeps", json=body | {"run_dir": "/tmp/x"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "run_dir"
    sweeps_dir = tmp_path / "runs-sweeps"
    assert not sweeps_dir.exists() or not any(sweeps_dir.iterdir())

    # One trial at a time, so the sweep can be stopped between its trials.
    body["sweep"] = {"grid": {"distill.tau": [0.5, 0.9]}, "max_concurrent_trials": 1}
    key = {"Idempotency-Key": "sweep-tau-1"}
    r = api.post("/v1/sweeps", json=body, headers=key)
    assert r.status_code == 201, r.text
    sweep = r.json()
    sid = sweep["id"]
    assert r.headers["Location"] == f"/v1/sweeps/{sid}" and sweep["trials"] == 2
    assert sweep["status"] in ("pending", "running") and sweep["idempotency_key"] == "sweep-tau-1"
    again = api.post("/v1/sweeps", json=body, headers=key)
    assert again.status_code == 200 and again.json()["id"] == sid
    assert again.headers["Idempotent-Replayed"] == "true"
    other = body | {"sweep": body["sweep"] | {"grid": {"distill.tau": [0.7]}}}
    assert api.post("/v1/sweeps", json=other, headers=key).status_code == 422
    # The cap is 1: a second sweep waits; an active sweep is neither deleted nor resumed.
    r = api.post("/v1/sweeps", json=other)
    assert r.status_code == 429 and r.headers["retry-after"]
    assert api.delete(f"/v1/sweeps/{sid}").status_code == 409
    assert api.post(f"/v1/sweeps/{sid}/resume").status_code == 409

    # Stop once the first trial has finished.
    def first_done(view: dict) -> bool:
        rows = (view.get("summary") or {}).get("rows", [])
        return any(row["status"] == "completed" for row in rows) or view["status"] not in (
            "pending", "running",
        )

    view = wait(sid, first_done)
    assert view["status"] == "running", view
    done = [row for row in view["summary"]["rows"] if row["status"] == "completed"]
    assert len(done) == 1, view["summary"]["rows"]
    finished = sweeps_dir / sid / done[0]["run_dir"]
    committed = mtime(finished)
    r = api.post(f"/v1/sweeps/{sid}/stop")
    assert r.status_code == 202, r.text
    stopped = wait(sid, lambda v: v["status"] not in ("running", "stopping"), timeout=90)
    assert stopped["status"] == "stopped", stopped
    assert stopped["ray_job"]["status"] == "STOPPED"
    assert api.post(f"/v1/sweeps/{sid}/stop").status_code == 200  # idempotent
    rows = {row["trial"]: row["status"] for row in stopped["summary"]["rows"]}
    assert sorted(rows.values()) != ["completed", "completed"], rows

    r = api.post(f"/v1/sweeps/{sid}/resume")
    assert r.status_code == 202, r.text
    assert r.json()["job_ids"] == [f"dmsae-sweep-{sid}-1", f"dmsae-sweep-{sid}-2"]
    # The event stream follows the resumed sweep to its end.
    events = read_events(api, f"/v1/sweeps/{sid}/events", timeout=400)
    assert events[-1]["event"] == "end", events[-3:]
    trials = [e["data"] for e in events if e["event"] == "trial"]
    resumed_trial = next(r for r in trials if r["trial"] != done[0]["trial"])
    assert [r["status"] for r in trials if r["trial"] == resumed_trial["trial"]][-1] == "completed"
    progress = [e["data"] for e in events if e["event"] == "progress"]
    assert progress[-1]["counts"] == {"completed": 2} and progress[-1]["trials"] == 2
    sweep = get(sid)
    assert sweep["status"] == "completed", (sweep, api.get(f"/v1/sweeps/{sid}/logs").text)
    assert mtime(finished) == committed  # the finished trial was not run again
    first = api.get(f"/v1/sweeps/{sid}/logs", params={"attempt": 1})
    assert first.status_code == 200 and f"sweep {sid}" in first.text
    resumed = api.get(f"/v1/sweeps/{sid}/logs")  # the latest job
    assert resumed.status_code == 200 and "1 already complete, 1 to run" in resumed.text
    tail = api.get(f"/v1/sweeps/{sid}/logs", params={"tail": 5}).text
    assert tail.splitlines() == resumed.text.splitlines()[-5:]
    assert api.get(f"/v1/sweeps/{sid}/logs", params={"attempt": 3}).status_code == 404
    listed = api.get("/v1/sweeps").json()
    assert [s["id"] for s in listed["items"]] == [sid] and listed["total"] == 1
    summary = api.get(f"/v1/sweeps/{sid}/summary").json()
    assert len(summary["rows"]) == 2
    for row in summary["rows"]:
        state = state_of(sweeps_dir / sid / row["run_dir"])
        assert row["status"] == "completed"
        assert row["core_size"] == state["cycles"][-1]["core_size"]
        assert row["explained_variance"] == state["cycles"][-1]["eval"]["explained_variance"]
    r = api.get(f"/v1/sweeps/{sid}/artifacts/{PLOT_CORE}")
    assert r.status_code == 200 and r.content[:8] == PNG
    r = api.get(f"/v1/sweeps/{sid}/artifacts/summary.csv")
    assert r.status_code == 200 and r.text.count("\n") == 3
    assert api.get("/v1/sweeps/0123456789ab").status_code == 404
    assert api.get(f"/v1/sweeps/{sid}/artifacts/../x").status_code in (400, 404)

    # Finished: it can be deleted, with its trials, and is gone.
    assert api.post(f"/v1/sweeps/{sid}/resume").status_code == 409
    assert api.delete(f"/v1/sweeps/{sid}").status_code == 204
    assert api.get(f"/v1/sweeps/{sid}").status_code == 404
    assert not (sweeps_dir / sid).exists()

