"""dmsae_ray/distributed/coordinator.py on the session's real Ray cluster: the coordinator actor
owns a run's state, writes every change to state.json, and a new or restarted actor picks it up from
there."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray

from dmsae_ray.distributed.coordinator import (
    NAMESPACE,
    CoordinatorState,
    coordinator_name,
    get_coordinator,
)
from dmsae_ray.run.rundir import RunDir


@pytest.fixture
def coordinator(ray_head) -> Iterator[Callable[[Path], ray.actor.ActorHandle]]:
    """get_coordinator, with every actor it made killed afterwards: they are detached, so
    they would otherwise outlive the test (and hold their names) until the cluster goes."""
    made: list[Path] = []

    def get(run_dir: Path) -> ray.actor.ActorHandle:
        made.append(run_dir)
        return get_coordinator(run_dir)

    yield get
    for run_dir in made:
        try:
            ray.kill(ray.get_actor(coordinator_name(run_dir), namespace=NAMESPACE))
        except ValueError:
            pass  # killed by the test itself


def _on_disk(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def _wait_until_gone(run_dir: Path) -> None:
    """ray.kill returns before the actor's name is free; a get_if_exists in between would get
    the dying actor."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            get_coordinator(run_dir, create=False)
        except ValueError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{coordinator_name(run_dir)} still registered after ray.kill")


def _summary(cycle: int) -> dict:
    # What the pipeline commits: a plain dict, as it crosses to the actor.
    return {"cycle": cycle, "core_in": 0, "core_size": 5, "jaccard": None, "fraction": 0.9,
            "train": {"steps": 16}, "eval": {"fve": 0.5}, "seconds": 1.5}


def test_coordinator_name_is_the_resolved_run_dir(tmp_path, monkeypatch):
    name = coordinator_name(tmp_path / "run")
    assert name.startswith("coordinator-") and len(name) == len("coordinator-") + 16
    int(name.removeprefix("coordinator-"), 16)  # hex
    monkeypatch.chdir(tmp_path)
    # the same directory however it is written: one actor per run, whoever asks
    assert coordinator_name("run") == name
    assert coordinator_name(Path("sub/../run")) == name
    assert coordinator_name(str(tmp_path / "run") + "/") == name
    monkeypatch.setenv("HOME", str(tmp_path))
    assert coordinator_name("~/run") == name
    assert coordinator_name(tmp_path / "other") != name


def test_a_fresh_run_starts_from_the_initial_state(coordinator, tmp_path):
    run_dir = tmp_path / "run"
    state = CoordinatorState(coordinator(run_dir))
    s = state.get()
    assert s["status"] == "created" and s["cycle"] == 0 and s["cycles"] == []
    assert s["stage"] is None and s["progress"] == {}
    assert not (run_dir / "state.json").exists()  # nothing written before the first change


def test_one_named_detached_actor_per_run(coordinator, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError):
        get_coordinator(run_dir, create=False)  # none yet, and create=False makes none
    first = CoordinatorState(coordinator(run_dir))
    first.update(status="running")
    # get_if_exists: a second driver (or a resumed one) gets the same actor, not a new one
    again = CoordinatorState(coordinator(run_dir))
    found = CoordinatorState(get_coordinator(run_dir, create=False))
    assert again.get()["status"] == found.get()["status"] == "running"
    assert found.update(norm_factor=2.0)["norm_factor"] == 2.0
    assert first.get()["norm_factor"] == 2.0
    named = ray.get_actor(coordinator_name(run_dir), namespace=NAMESPACE)
    assert ray.get(named.get.remote())["norm_factor"] == 2.0
    # another run directory, another actor with its own state
    other = CoordinatorState(coordinator(tmp_path / "other"))
    assert other.get()["status"] == "created"


def test_every_change_is_in_state_json(coordinator, tmp_path):
    run_dir = tmp_path / "run"
    state = CoordinatorState(coordinator(run_dir))
    s = state.update(status="running", norm_factor=1.25, d_in=64)
    assert _on_disk(run_dir) == s
    assert s["status"] == "running" and s["norm_factor"] == 1.25 and s["d_in"] == 64

    s = state.set_stage("train", cycle=0, tokens_total=4096)
    assert _on_disk(run_dir) == s
    assert s["stage"] == "train"
    assert s["progress"]["cycle"] == 0 and s["progress"]["tokens_total"] == 4096
    assert s["progress"]["stage_started"] <= s["updated"]

    # a new stage starts its progress afresh
    s = state.set_stage("evaluate", cycle=0)
    assert _on_disk(run_dir) == s
    assert s["progress"].keys() == {"cycle", "stage_started"}


def test_progress_rate_and_eta(coordinator, tmp_path):
    run_dir = tmp_path / "run"
    state = CoordinatorState(coordinator(run_dir))
    started = state.set_stage("train", cycle=1, tokens_total=1000)["progress"]["stage_started"]
    before = time.time()
    s = state.set_progress(tokens_done=250)
    p = s["progress"]
    assert _on_disk(run_dir) == s
    # merged into the stage's progress, not replacing it
    assert p["cycle"] == 1 and p["tokens_total"] == 1000 and p["stage_started"] == started
    # tokens per second since the stage started, measured inside the actor between the test's
    # clock before the call and the save that stamped "updated"
    assert 250 / (s["updated"] - started) <= p["tokens_per_s"] <= 250 / max(before - started, 1e-6)
    assert p["eta_s"] == 750 / p["tokens_per_s"]

    # past the total: no negative time left
    p = state.set_progress(tokens_done=1200)["progress"]
    assert p["tokens_done"] == 1200 and p["eta_s"] == 0


def test_progress_without_a_total_has_no_rate(coordinator, tmp_path):
    state = CoordinatorState(coordinator(tmp_path / "run"))
    state.set_stage("evaluate", cycle=0)
    p = state.set_progress(tokens_done=100)["progress"]
    assert p["tokens_done"] == 100 and "tokens_per_s" not in p and "eta_s" not in p
    state.set_stage("train", cycle=0, tokens_total=1000)
    # nothing done yet: no rate, and no division by it
    p = state.set_progress(tokens_done=0)["progress"]
    assert p["tokens_done"] == 0 and "tokens_per_s" not in p and "eta_s" not in p


def test_commit_cycle_is_idempotent(coordinator, tmp_path):
    run_dir = tmp_path / "run"
    state = CoordinatorState(coordinator(run_dir))
    state.set_stage("attribute", cycle=0)
    s = state.commit_cycle(_summary(0))
    assert s["cycle"] == 1 and s["cycles"] == [_summary(0)]
    assert s["stage"] == "committed" and s["progress"] == {}
    assert _on_disk(run_dir) == s
    written = (run_dir / "state.json").stat().st_mtime_ns

    # a retried call (the driver lost the answer) appends nothing and writes nothing
    again = state.commit_cycle(_summary(0))
    assert again == s and again["cycles"] == [_summary(0)]
    assert (run_dir / "state.json").stat().st_mtime_ns == written

    # a cycle out of order is refused, through the actor, and leaves the state as it was
    with pytest.raises(ValueError, match="commit of cycle 2, expected 1"):
        state.commit_cycle(_summary(2))
    assert state.get() == s == _on_disk(run_dir)

    s = state.commit_cycle(_summary(1))
    assert s["cycle"] == 2 and [c["cycle"] for c in s["cycles"]] == [0, 1]
    assert _on_disk(run_dir) == s


def test_a_new_actor_resumes_from_state_json(coordinator, tmp_path):
    run_dir = tmp_path / "run"
    state = CoordinatorState(coordinator(run_dir))
    state.update(status="running", norm_factor=1.5)
    state.commit_cycle(_summary(0))
    before = state.get()
    # the run's end (RayBackend.close) or a lost driver: the actor goes, the file stays
    ray.kill(state.handle)
    _wait_until_gone(run_dir)

    resumed = CoordinatorState(coordinator(run_dir))
    assert resumed.get() == before
    # and it goes on from there: cycle 0 is not committed twice, cycle 1 is next
    assert resumed.commit_cycle(_summary(0))["cycles"] == [_summary(0)]
    assert resumed.commit_cycle(_summary(1))["cycle"] == 2


def test_a_state_written_without_ray_is_picked_up(coordinator, tmp_path):
    # A run started with ray.enabled: false (RunState in the driver), resumed on Ray.
    run_dir = tmp_path / "run"
    rd = RunDir(run_dir)
    rd.root.mkdir()
    written = rd.load_state() | {"status": "failed", "cycle": 1, "cycles": [_summary(0)],
                                  "norm_factor": 3.0, "error": "KeyboardInterrupt: "}
    rd.save_state(written)
    s = CoordinatorState(coordinator(run_dir)).get()
    assert s == written


def test_a_restarted_actor_reads_state_json_again(coordinator, tmp_path):
    run_dir = tmp_path / "run"
    handle = coordinator(run_dir)
    state = CoordinatorState(handle)
    state.update(status="running", norm_factor=1.0)
    # While it lives, the actor's memory is the state: a change to the file behind its back
    # is not seen...
    rd = RunDir(run_dir)
    rd.save_state(rd.load_state() | {"norm_factor": 7.0})
    assert state.get()["norm_factor"] == 1.0
    # ...until the process dies and Ray restarts it (max_restarts=-1): __init__ reads the file.
    ray.kill(handle, no_restart=False)
    deadline = time.time() + 120
    seen = None
    while time.time() < deadline:
        try:
            seen = state.get()["norm_factor"]  # max_task_retries=-1: waits for the restart
        except ray.exceptions.RayActorError:
            seen = None
        if seen == 7.0:
            break
        time.sleep(0.2)
    assert seen == 7.0
    # the same named actor, restarted in place: still answering and still writing the file
    named = ray.get_actor(coordinator_name(run_dir), namespace=NAMESPACE)
    assert ray.get(named.get.remote())["norm_factor"] == 7.0
    assert state.update(status="completed")["norm_factor"] == 7.0
    assert _on_disk(run_dir)["status"] == "completed"
