"""dmsae_ray/distributed/ray_jobs.py without a cluster: ``RayJobs`` (the thread-safe, caching
wrapper of Ray's JobSubmissionClient the service uses) against a fake client that records each
call, and ``JobInfo`` from Ray's job details. tests/test_api.py has the cache shared by
concurrent reads on the real cluster."""

from __future__ import annotations

import sys
import types
from enum import Enum
from types import SimpleNamespace

import pytest
import requests

from dmsae_ray.distributed import ray_jobs
from dmsae_ray.service import STOP_ENV, JobInfo, RayJobs, RayUnavailable, ServiceError


class Status(Enum):
    RUNNING = "RUNNING"


def details(submission_id="dmsae-a", job_id="raysubmit_1", status="RUNNING", **kw):
    return SimpleNamespace(
        submission_id=submission_id, job_id=job_id, status=status,
        message=kw.get("message"), start_time=kw.get("start_time"),
        end_time=kw.get("end_time"), metadata=kw.get("metadata"),
    )


class FakeClient:
    """JobSubmissionClient's methods RayJobs calls, recording each call; ``fail`` maps a method
    name to the exception it raises."""

    def __init__(self, jobs=None, fail=None):
        self.jobs = jobs or {}
        self.fail = fail or {}
        self.calls: list[tuple[str, tuple, dict]] = []

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def get_job_info(self, job_id):
        self._record("get_job_info", job_id)
        if job_id not in self.jobs:
            raise RuntimeError(f"Job {job_id} does not exist")
        return self.jobs[job_id]

    def list_jobs(self):
        self._record("list_jobs")
        return list(self.jobs.values())

    def submit_job(self, **kwargs):
        self._record("submit_job", **kwargs)
        return kwargs["submission_id"]

    def stop_job(self, job_id):
        self._record("stop_job", job_id)
        return job_id in self.jobs

    def delete_job(self, job_id):
        self._record("delete_job", job_id)
        return job_id in self.jobs

    def get_job_logs(self, job_id):
        self._record("get_job_logs", job_id)
        return f"logs of {job_id}"

    def _do_request(self, method, path):
        self._record("_do_request", method, path)
        return self.response


def jobs_with(client, **kw):
    jobs = RayJobs("http://127.0.0.1:1", **kw)
    jobs._client = client  # what the lazy constructor would have made
    return jobs


def names(client):
    return [c[0] for c in client.calls]


def test_job_info_converts_ray_job_details():
    info = ray_jobs._job_info(details(status=Status.RUNNING, start_time=1_500, end_time=0,
                                     message="m", metadata={"run": "r1"}))
    assert info == JobInfo("dmsae-a", "RUNNING", "m", 1.5, None, {"run": "r1"})
    assert not info.terminal
    assert info.as_dict() == {"job_id": "dmsae-a", "status": "RUNNING", "message": "m",
                              "start_time": 1.5, "end_time": None}
    bare = ray_jobs._job_info(details(submission_id=None, status="FAILED", metadata=None))
    assert bare.job_id == "raysubmit_1" and bare.metadata == {} and bare.terminal
    assert {s: JobInfo("j", s).terminal for s in ("PENDING", "RUNNING", "STOPPED", "SUCCEEDED",
                                                   "FAILED")} == {
        "PENDING": False, "RUNNING": False, "STOPPED": True, "SUCCEEDED": True, "FAILED": True,
    }


def test_job_status_is_cached_and_invalidated():
    client = FakeClient({"dmsae-a": details()})
    jobs = jobs_with(client, cache_ttl=1e9)
    assert jobs.info("dmsae-a").status == "RUNNING"
    assert jobs.info("dmsae-a").status == "RUNNING"
    assert names(client) == ["get_job_info"]
    assert jobs.info("dmsae-gone") is None and jobs.info("dmsae-gone") is None  # cached too
    assert names(client) == ["get_job_info"] * 2
    jobs.invalidate("dmsae-a")
    jobs.info("dmsae-a")
    assert names(client) == ["get_job_info"] * 3
    uncached = FakeClient({"dmsae-a": details()})
    jobs0 = jobs_with(uncached, cache_ttl=0)
    jobs0.info("dmsae-a")
    jobs0.info("dmsae-a")
    assert names(uncached) == ["get_job_info"] * 2


def test_job_server_errors_are_told_apart():
    refused = FakeClient(fail={"get_job_info": RuntimeError("500 internal error")})
    with pytest.raises(ServiceError, match="500 internal error"):
        jobs_with(refused).info("dmsae-a")
    for err in (ConnectionError("refused"), requests.exceptions.ConnectTimeout("slow")):
        client = FakeClient(fail={"get_job_info": err})
        jobs = jobs_with(client)
        with pytest.raises(RayUnavailable, match="unreachable"):
            jobs.info("dmsae-a")
        assert jobs._client is None  # recreated on the next call


def test_submit_passes_the_command_env_metadata_and_resources():
    client = FakeClient()
    jobs = jobs_with(client)
    job_id = jobs.submit("dmsae run --config x", "dmsae-1", {"attempt": 2},
                         {"entrypoint_num_gpus": 1})
    assert job_id == "dmsae-1"
    [(_, _, kw)] = client.calls
    assert kw == {
        "entrypoint": "dmsae run --config x", "submission_id": "dmsae-1",
        "metadata": {"attempt": "2"}, "runtime_env": {"env_vars": STOP_ENV},
        "entrypoint_num_gpus": 1,
    }
    bare = FakeClient()
    jobs_with(bare, env_vars={}).submit("c", "dmsae-2")
    assert bare.calls[0][2]["runtime_env"] is None and bare.calls[0][2]["metadata"] == {}
    refused = FakeClient(fail={"submit_job": RuntimeError("job dmsae-1 already exists")})
    with pytest.raises(ServiceError, match="Ray refused the job: job dmsae-1 already exists"):
        jobs_with(refused).submit("c", "dmsae-1")


def test_a_submission_invalidates_its_cached_status():
    client = FakeClient()
    jobs = jobs_with(client, cache_ttl=1e9)
    assert jobs.info("dmsae-1") is None  # not yet submitted: cached as unknown
    jobs.submit("c", "dmsae-1")
    client.jobs["dmsae-1"] = details("dmsae-1", status="PENDING")
    assert jobs.info("dmsae-1").status == "PENDING"


def test_stop_delete_and_logs_of_unknown_jobs():
    client = FakeClient({"dmsae-a": details()})
    jobs = jobs_with(client)
    assert jobs.stop("dmsae-a") is True and jobs.stop("dmsae-b") is False
    assert jobs.delete("dmsae-a") is True
    assert jobs.logs("dmsae-a") == "logs of dmsae-a"
    failing = FakeClient(fail={n: RuntimeError("404") for n in
                               ("stop_job", "delete_job", "get_job_logs")})
    jobs = jobs_with(failing)
    assert jobs.stop("x") is False and jobs.delete("x") is False and jobs.logs("x") is None
    down = FakeClient(fail={"stop_job": ConnectionError("down")})
    with pytest.raises(RayUnavailable):
        jobs_with(down).stop("x")


def test_all_lists_submitted_jobs_only_and_caches_them():
    client = FakeClient({"dmsae-a": details(), "driver": details(submission_id=None,
                                                                   job_id="01000000")})
    jobs = jobs_with(client, cache_ttl=1e9)
    assert list(jobs.all()) == ["dmsae-a"]
    jobs.all()
    assert names(client) == ["list_jobs"]
    jobs.invalidate()
    jobs.all()
    assert names(client) == ["list_jobs"] * 2


def test_ping_reads_the_ray_version():
    client = FakeClient()
    client.response = SimpleNamespace(status_code=200, json=lambda: {"ray_version": "2.60.0"})
    assert jobs_with(client).ping() == "2.60.0"
    assert client.calls == [("_do_request", ("GET", "/api/version"), {})]
    client.response = SimpleNamespace(status_code=503, json=lambda: {})
    with pytest.raises(RayUnavailable, match="503"):
        jobs_with(client).ping()
    client.response = SimpleNamespace(status_code=200, json=lambda: {"version": "4"})
    with pytest.raises(RayUnavailable, match="no ray_version"):
        jobs_with(client).ping()


def test_the_client_is_made_lazily_and_its_failures_are_unavailability(monkeypatch):
    made = []

    def make(address):
        made.append(address)
        if address == "down":
            raise ConnectionError("connection refused")
        if address == "odd":
            raise ValueError("version mismatch")
        return FakeClient()

    module = types.ModuleType("ray.job_submission")
    module.JobSubmissionClient = make
    monkeypatch.setitem(sys.modules, "ray.job_submission", module)  # no Ray import
    jobs = RayJobs("http://head:8265")
    assert made == []
    assert isinstance(jobs.client, FakeClient) and jobs.client is jobs.client
    assert made == ["http://head:8265"]
    with pytest.raises(RayUnavailable, match="unreachable"):
        _ = RayJobs("down").client
    with pytest.raises(RayUnavailable, match="unusable: version mismatch"):
        _ = RayJobs("odd").client
