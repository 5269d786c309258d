"""Record-then-submit (issue #13, probe 6): between the run's record and Ray's answer to the job
submission, the job is unknown to the cluster. A list in that window once marked the run
"failed" for good, and a DELETE then removed the directory of a run whose job was starting.

The service's own ``Runs`` against the session's real Ray cluster; the only thing added is a
gate that holds the real submission open, as a slow job server would.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_config
from fastapi import HTTPException

from api.app import Runs, Settings
from dmsae_ray import service
from dmsae_ray.config import RunConfig


class GatedJobs(service.RayJobs):
    """The real job client; ``submit`` waits for ``gate`` first (a slow job server)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def submit(self, *args, **kwargs) -> str:
        self.waiting.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().submit(*args, **kwargs)


@pytest.fixture()
def runs(ray_head, tiny_dir, tmp_path) -> Runs:
    root = str(tiny_dir["root"])
    settings = Settings(
        runs_root=tmp_path / "runs", ray_address=ray_head["dashboard"],
        model_roots=[root], data_roots=[root],
    )
    r = Runs(settings)
    r.jobs = GatedJobs(ray_head["dashboard"], env_vars=settings.job_env)
    return r


def _in_background(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            out["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _status(runs: Runs, run_id: str) -> str:
    (view,) = [v for v in runs.list(None, 100, 0)["items"] if v["id"] == run_id]
    return view["status"]


def _wait_terminal(runs: Runs, run_id: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while (s := _status(runs, run_id)) not in service.TERMINAL:
        assert time.monotonic() < deadline, f"run {run_id} still {s}"
        time.sleep(0.5)
    return s


def _refused_delete(runs: Runs, run_id: str) -> int:
    with pytest.raises(HTTPException) as err:
        runs.delete(runs.record(run_id))
    return err.value.status_code


def test_a_run_being_submitted_is_pending_and_cannot_be_deleted(runs, tiny_dir):
    body = tiny_config(tiny_dir, Path("unused"), distill={"cycles": 20})
    del body["run_dir"]  # the server chooses it
    cfg = RunConfig.model_validate(body)
    jobs: GatedJobs = runs.jobs  # type: ignore[assignment]

    # 1. create: the record exists, the job is not yet known to Ray.
    t, out = _in_background(runs.create, cfg, None, "race-test")
    assert jobs.waiting.wait(30), out
    (rec,) = runs.store.all()
    assert _status(runs, rec.id) == service.PENDING  # not "failed: unknown to the cluster"
    assert not runs.store.get(rec.id).status_final
    jobs.gate.set()
    t.join(60)
    assert "error" not in out, out.get("error")
    # What the list saw in the window stays unsaid: the job runs and the run is not deletable.
    assert _status(runs, rec.id) in (service.PENDING, service.RUNNING)
    assert _refused_delete(runs, rec.id) == 409
    assert Path(rec.run_dir).is_dir()

    # Stop it, then 2. resume: until the new job is recorded the record names the stopped one,
    # and a DELETE (which does not wait for submissions) comes in between.
    runs.stop(runs.record(rec.id))
    assert _wait_terminal(runs, rec.id) == service.STOPPED
    jobs.gate.clear()
    jobs.waiting.clear()
    t, out = _in_background(runs.resume, runs.record(rec.id))
    assert jobs.waiting.wait(30), out
    assert _status(runs, rec.id) == service.PENDING
    assert _refused_delete(runs, rec.id) == 409
    jobs.gate.set()
    t.join(60)
    assert "error" not in out, out.get("error")
    assert runs.record(rec.id).job_ids == [f"dmsae-{rec.id}-1", f"dmsae-{rec.id}-2"]
    assert _status(runs, rec.id) in (service.PENDING, service.RUNNING)

    runs.stop(runs.record(rec.id))
    assert _wait_terminal(runs, rec.id) == service.STOPPED
    runs.delete(runs.record(rec.id))
    assert not Path(rec.run_dir).exists()
