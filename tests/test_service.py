"""dmsae_ray/service.py without a server or a cluster: job commands and resources, submission
(through tests/test_ray_jobs.py's fake client), the status rules, and safe reads of a run
directory.

tests/test_api.py has what needs the server or the cluster (the job status cache shared by
concurrent reads, among others).
"""

from __future__ import annotations

import errno
import json
import pathlib
import shlex

import pytest
from test_ray_jobs import FakeClient, jobs_with

from dmsae_ray.config import RunConfig, validate
from dmsae_ray.run import runfiles
from dmsae_ray.run.heartbeat import Liveness
from dmsae_ray.service import (
    ArtifactPathError,
    JobInfo,
    config_digest,
    entrypoint,
    job_resources,
    list_artifacts,
    paginate,
    prepare_run,
    read_cycle,
    read_state,
    resolve_artifact,
    run_status,
    state_mtime,
    submit_run,
    submit_sweep,
    sweep_entrypoint,
)

# ----------------------------------------------------------------------------- run config


def test_prepare_run_pins_an_absolute_run_dir_in_request_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = validate({"sae": {"k": 16}, "run_dir": "somewhere/else"})
    pinned, path = prepare_run(cfg, "runs/r1")
    root = tmp_path / "runs" / "r1"
    assert path == root / "request.json" and pinned.run_dir == str(root)
    assert RunConfig.model_validate(json.loads(path.read_text())) == pinned
    assert pinned.sae.k == 16
    assert [p.name for p in root.iterdir()] == ["request.json"]  # written atomically
    # A resume writes it again.
    pinned2, _ = prepare_run(validate({"sae": {"k": 32}}), root)
    assert json.loads(path.read_text())["sae"]["k"] == 32 and pinned2.run_dir == str(root)


def test_config_digest_ignores_defaults_and_run_dir():
    plain = config_digest(validate({}))
    assert config_digest(validate({"distill": {"tau": 0.9}, "run_dir": "/elsewhere"})) == plain
    assert config_digest(validate({"distill": {"tau": 0.8}})) != plain


def test_config_digest_is_a_stable_hash_of_what_differs_from_the_defaults():
    plain = config_digest(validate({}))
    assert len(plain) == 64 and int(plain, 16) >= 0
    assert config_digest(validate({"sae": {"k": 320}})) == plain  # the default, written out
    a = validate({"sae": {"k": 16}, "train": {"lr": 1e-3}})
    b = validate({"train": {"lr": 1e-3}, "sae": {"k": 16}})
    assert config_digest(a) == config_digest(b) != plain
    assert config_digest(validate({"sae": {"k": 17}, "train": {"lr": 1e-3}})) != config_digest(a)


def test_entrypoints_quote_every_path_for_the_shell():
    odd = "/runs/it's a $HOME; rm -rf x/request.json"
    cmd = entrypoint(odd, command="/opt/venv/bin/dmsae")
    assert shlex.split(cmd) == ["/opt/venv/bin/dmsae", "run", "--config", odd]
    sweep = sweep_entrypoint("/s w/request.json", "/s w", command="dmsae")
    assert sweep == "dmsae sweep --config '/s w/request.json' --sweep-dir '/s w'"
    assert shlex.split(sweep_entrypoint(odd, "/a b")) == [
        "dmsae", "sweep", "--config", odd, "--sweep-dir", "/a b",
    ]


def test_job_resources_on_cpu_reserve_nothing():
    assert job_resources(validate({"ray": {"use_gpu": False, "num_workers": 0}})) == {}


def test_job_gpus_only_when_the_driver_does_the_work():
    assert job_resources(RunConfig()) == {}
    gpu = {"ray": {"use_gpu": True, "num_workers": 0}}
    assert job_resources(RunConfig.model_validate(gpu)) == {"entrypoint_num_gpus": 1}
    workers = {"ray": {"use_gpu": True, "num_workers": 2}}
    assert job_resources(RunConfig.model_validate(workers)) == {}
    assert entrypoint("/r/a b/request.json") == "dmsae run --config '/r/a b/request.json'"


def test_submit_run_and_submit_sweep_build_the_job(tmp_path):
    client = FakeClient()
    jobs = jobs_with(client, env_vars={})
    jobs.command = "/venv/bin/dmsae"
    cfg = validate({"ray": {"use_gpu": True, "num_workers": 0}})
    submit_run(jobs, cfg, tmp_path / "run one", "dmsae-r", {"name": "r"})
    kw = client.calls[-1][2]
    request = tmp_path / "run one" / "request.json"
    assert shlex.split(kw["entrypoint"]) == ["/venv/bin/dmsae", "run", "--config", str(request)]
    assert kw["entrypoint_num_gpus"] == 1 and kw["metadata"] == {"name": "r"}
    assert json.loads(request.read_text())["run_dir"] == str(tmp_path / "run one")
    submit_sweep(jobs, tmp_path / "s" / "request.json", tmp_path / "s", "dmsae-s")
    kw = client.calls[-1][2]
    assert kw["entrypoint"].startswith("/venv/bin/dmsae sweep --config ")
    assert "entrypoint_num_gpus" not in kw


# ----------------------------------------------------------------------------- status


def job(status, start=100.0, message=None):
    return JobInfo("j", status, message=message, start_time=start)


def test_run_status_combines_state_and_job():
    running = {"status": "running", "error": None}
    assert run_status(None, job("PENDING")) == ("pending", None)
    assert run_status(running, job("RUNNING")) == ("running", None)
    assert run_status(running, job("RUNNING"), stop_requested=True) == ("stopping", None)
    # A killed job leaves state.json at "running": the job decides.
    assert run_status(running, job("STOPPED")) == ("stopped", None)
    assert run_status(running, job("FAILED"))[0] == "failed"
    failed = {"status": "failed", "error": "OSError: disk full"}
    assert run_status(failed, job("FAILED")) == ("failed", "OSError: disk full")
    # Completed once the driver has exited too: until then it still holds cluster resources.
    assert run_status({"status": "completed"}, job("RUNNING")) == ("running", None)
    assert run_status({"status": "completed"}, job("SUCCEEDED")) == ("completed", None)
    assert run_status({"status": "completed"}, job("FAILED")) == ("completed", None)
    assert run_status({"status": "completed"}, None) == ("completed", None)
    assert run_status({"status": "completed"}, None, ray_reachable=False) == ("completed", None)
    assert run_status(running, job("SUCCEEDED"))[0] == "failed"
    # After a resume the previous job's "stopped" is stale until the new job rewrites it;
    # a "stopped" written while this job runs means it is on its way out.
    stopped = {"status": "stopped"}
    assert run_status(stopped, job("RUNNING"), state_time=50.0) == ("running", None)
    assert run_status(stopped, job("RUNNING"), state_time=150.0) == ("stopping", None)
    # Job unknown to a reachable cluster (deleted, cluster restarted) / Ray unreachable.
    assert run_status(running, None)[0] == "failed"
    assert run_status(stopped, None) == ("stopped", None)
    assert run_status(running, None, ray_reachable=False) == ("running", None)
    assert run_status(None, None, ray_reachable=False) == ("pending", None)


def test_run_status_from_the_directory_alone_uses_the_heartbeat():
    running = {"status": "running", "error": None}
    dead = Liveness(False, "pid 42 is gone", 3.0)
    alive = Liveness(True, "beat 2 s ago", 2.0)
    status, err = run_status(running, None, ray_reachable=False, driver=dead)
    assert status == "failed" and "pid 42 is gone" in err
    assert run_status(running, None, ray_reachable=False, driver=alive) == ("running", None)
    assert run_status({"status": "created"}, None, ray_reachable=False) == ("pending", None)
    failed = {"status": "failed", "error": "ValueError: x"}
    assert run_status(failed, None, ray_reachable=False, driver=dead) == ("failed",
                                                                          "ValueError: x")
    stopped = {"status": "stopped", "error": None}
    assert run_status(stopped, None, ray_reachable=False, driver=dead) == ("stopped", None)


def test_run_status_other_job_cases():
    running = {"status": "running", "error": None}
    failed = {"status": "failed", "error": "OSError: disk full"}
    assert run_status(failed, None) == ("failed", "OSError: disk full")  # job deleted since
    assert run_status(None, None)[0] == "failed"  # a reachable cluster forgot the job
    assert run_status(None, job("PENDING"), stop_requested=True) == ("stopping", None)
    # Without the job's start time a "stopped" state cannot be told fresh: still running.
    assert run_status({"status": "stopped"}, job("RUNNING", start=None),
                      state_time=500.0) == ("running", None)
    assert run_status({"status": "completed"}, job("STOPPED")) == ("completed", None)
    assert run_status(None, job("SUCCEEDED")) == (
        "failed", "the job exited without completing the run")
    assert run_status(running, job("FAILED", message="exit code 137")) == (
        "failed", "exit code 137")
    assert run_status(None, job("FAILED")) == ("failed", "the Ray job failed")
    assert run_status(failed, job("STOPPED")) == ("stopped", None)  # the stop decides


# ----------------------------------------------------------------------------- run directory


def test_read_state_missing_valid_and_retried_once(tmp_path, monkeypatch):
    assert read_state(tmp_path) is None
    assert state_mtime(tmp_path) is None
    path = tmp_path / "state.json"
    path.write_text('{"status": "running"}')
    assert read_state(tmp_path) == {"status": "running"}
    assert state_mtime(tmp_path) == path.stat().st_mtime

    path.write_text('{"status": "runn')  # a writer that is not atomic, caught mid-write
    retries = []

    def finish_the_write(seconds):  # instead of waiting: the writer finishes meanwhile
        retries.append(seconds)
        path.write_text('{"status": "completed"}')

    monkeypatch.setattr(runfiles.time, "sleep", finish_the_write)
    assert read_state(tmp_path) == {"status": "completed"}
    assert len(retries) == 1

    path.write_text("{")
    monkeypatch.setattr(runfiles.time, "sleep", lambda s: retries.append(s))
    with pytest.raises(json.JSONDecodeError):
        read_state(tmp_path)  # still broken after the retry: an error, not "no state"
    assert len(retries) == 2


def test_read_cycle_combines_summary_core_metrics_and_artifacts(tmp_path):
    d = tmp_path / "cycles" / "001"
    (d / "sae").mkdir(parents=True)
    (d / "core.json").write_text('{"ids": [[0, 1]]}')
    (d / "sae" / "metrics.json").write_text('{"fve": 0.9}')
    (d / ".core.json.tmp").write_text("half")
    state = {"cycles": [{"cycle": 0}, {"cycle": 1, "core_size": 1}]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    out = read_cycle(tmp_path, 1)
    assert out["cycle"] == 1 and out["summary"] == {"cycle": 1, "core_size": 1}
    assert out["core"] == {"ids": [[0, 1]]} and out["metrics"] == {"fve": 0.9}
    assert [a["path"] for a in out["artifacts"]] == ["cycles/001/core.json",
                                                     "cycles/001/sae/metrics.json"]
    assert read_cycle(tmp_path, 1, state={"cycles": []})["summary"] is None
    assert read_cycle(tmp_path, 2) is None  # not committed
    (tmp_path / "cycles" / "000").mkdir()  # written, not yet in state.json; no files yet
    assert read_cycle(tmp_path, 0, state={}) == {
        "cycle": 0, "summary": None, "core": None, "metrics": None, "artifacts": [],
    }


def test_artifact_paths_are_confined(tmp_path):
    root = tmp_path / "run"
    (root / "cycles" / "000").mkdir(parents=True)
    (root / "cycles" / "000" / "core.json").write_text("{}")
    (root / "cycles" / ".001.tmp").mkdir()
    (root / "cycles" / ".001.tmp" / "core.json").write_text("{}")
    (tmp_path / "secret").write_text("x")
    (root / "out").symlink_to(tmp_path / "secret")
    assert resolve_artifact(root, "cycles/000/core.json") == root / "cycles/000/core.json"
    assert resolve_artifact(root, "./cycles//000/core.json").name == "core.json"
    for bad in ("", "/etc/passwd", "../secret", "cycles/../../secret", "a\\b", "C:/x", "a\x00"):
        with pytest.raises(ArtifactPathError):
            resolve_artifact(root, bad)
    for missing in ("out", "cycles", "cycles/.001.tmp/core.json", "nope"):
        with pytest.raises(FileNotFoundError):
            resolve_artifact(root, missing)
    assert [a["path"] for a in list_artifacts(root)] == ["cycles/000/core.json"]


def test_list_artifacts_follows_links_only_inside_and_skips_broken_ones(tmp_path):
    root = tmp_path / "run"
    (root / "cycles" / "000").mkdir(parents=True)
    (root / "cycles" / "000" / "core.json").write_text("12345")
    (root / "config.json").write_text("{}")
    (root / ".state.json.x1y2").write_text("{")
    (root / "latest").symlink_to(root / "cycles" / "000" / "core.json")
    (root / "broken").symlink_to(root / "nowhere")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("x")
    (root / "ext").symlink_to(tmp_path / "outside", target_is_directory=True)
    items = list_artifacts(root)
    assert [a["path"] for a in items] == ["config.json", "latest", "cycles/000/core.json"]
    assert items[2]["size"] == 5 and isinstance(items[2]["modified"], float)
    assert [a["path"] for a in list_artifacts(root, prefix="cycles")] == ["cycles/000/core.json"]
    assert list_artifacts(root, prefix="nope") == []
    assert list_artifacts(tmp_path / "missing") == []


def test_resolve_artifact_more_confinement_cases(tmp_path):
    root = tmp_path / "run"
    (root / "cycles" / "000").mkdir(parents=True)
    core = root / "cycles" / "000" / "core.json"
    core.write_text("{}")
    (root / "latest").symlink_to(core)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("x")
    (root / "ext").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    assert resolve_artifact(root, "latest") == core  # a link inside the run dir is fine
    assert resolve_artifact(root, "cycles/./000/core.json") == core
    for malformed in (".", "./", "..", "cycles/..", "a/../../b", "\\\\server\\share"):
        with pytest.raises(ArtifactPathError):
            resolve_artifact(root, malformed)
    for refused in ("ext/secret", "loop_a", ".hidden", "cycles/000/.core.json.tmp", "cycles/000"):
        with pytest.raises(FileNotFoundError):
            resolve_artifact(root, refused)


def test_a_symlink_loop_is_not_found_whatever_the_python(tmp_path, monkeypatch):
    """Python 3.13 raises OSError(ELOOP) for a loop where 3.11 raised RuntimeError: both mean
    'not found' to the service, never an unhandled error."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "ok.json").write_text("{}")
    (root / "loop").symlink_to(root / "loop")
    real = pathlib.Path.resolve

    def resolve_313(self, strict=False):
        if strict and self.name == "loop":
            raise OSError(errno.ELOOP, "Too many levels of symbolic links", str(self))
        return real(self, strict=strict)

    monkeypatch.setattr(pathlib.Path, "resolve", resolve_313)
    with pytest.raises(FileNotFoundError):
        resolve_artifact(root, "loop")
    assert [a["path"] for a in list_artifacts(root)] == ["ok.json"]


def test_paginate_filters_then_pages():
    views = [{"id": i, "status": "running" if i % 2 else "completed"} for i in range(7)]
    page = paginate(views, None, 3, 0)
    assert [v["id"] for v in page["items"]] == [0, 1, 2]
    assert (page["total"], page["limit"], page["offset"], page["next_offset"]) == (7, 3, 0, 3)
    last = paginate(views, None, 3, 6)
    assert [v["id"] for v in last["items"]] == [6] and last["next_offset"] is None
    exact = paginate(views, None, 7, 0)
    assert len(exact["items"]) == 7 and exact["next_offset"] is None
    running = paginate(views, "running", 2, 0)
    assert [v["id"] for v in running["items"]] == [1, 3] and running["total"] == 3
    assert running["next_offset"] == 2
    assert paginate(views, "running", 2, 2)["next_offset"] is None
    beyond = paginate(views, None, 5, 50)
    assert beyond["items"] == [] and beyond["total"] == 7 and beyond["next_offset"] is None
    assert paginate(views, "failed", 10, 0)["total"] == 0
