"""The REST service end to end: the real app under real uvicorn (`dmsae serve` in a
subprocess) against a real local Ray cluster (`ray start --head --block` in a subprocess),
httpx as the client. The tests share one cluster, one server and two runs, and build on each
other in file order (run with -x)."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import tiny_config
from serving import ENV, TOKEN, Server, _env, read_events, stop_leftover_jobs


@pytest.fixture(scope="module", autouse=True)
def _ray_env(monkeypatch_module):
    for k, v in ENV.items():
        monkeypatch_module.setenv(k, v)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def ray_cluster(ray_head, _ray_env) -> str:
    """The session's Ray cluster (conftest): its job server URL."""
    return ray_head["dashboard"]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory) -> Iterator[Server]:
    srv = Server(ray_cluster, tmp_path_factory.mktemp("api"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        stop_leftover_jobs(ray_cluster)


@pytest.fixture(scope="module")
def api(server) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
def runs() -> dict:
    """Ids of the runs the tests create, shared in file order."""
    return {}


def body(tiny_dir, **sections) -> dict:
    cfg = tiny_config(tiny_dir, Path("unused"), **sections)
    del cfg["run_dir"]  # the server chooses it
    return cfg


def wait_for(api: httpx.Client, run_id: str, pred, timeout: float = 240, every=0.5) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = api.get(f"/v1/distillations/{run_id}")
        assert r.status_code == 200, r.text
        view = r.json()
        if pred(view):
            return view
        if time.monotonic() > deadline:
            logs = api.get(f"/v1/distillations/{run_id}/logs").text
            raise TimeoutError(f"run {run_id} stuck at {view}\n--- logs ---\n{logs[-4000:]}")
        time.sleep(every)


# --------------------------------------------------------------------------- without Ray


def test_run_status_combines_state_and_job():
    from dmsae_ray.service import JobInfo, run_status

    def job(status, start=100.0):
        return JobInfo("j", status, start_time=start)

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


def test_config_digest_ignores_defaults_and_run_dir():
    from dmsae_ray.config import validate
    from dmsae_ray.service import config_digest

    plain = config_digest(validate({}))
    assert config_digest(validate({"distill": {"tau": 0.9}, "run_dir": "/elsewhere"})) == plain
    assert config_digest(validate({"distill": {"tau": 0.8}})) != plain


def test_artifact_paths_are_confined(tmp_path):
    from dmsae_ray.service import ArtifactPathError, list_artifacts, resolve_artifact

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


def test_concurrent_status_reads_share_one_job_server_call(ray_cluster):
    from dmsae_ray.service import RayJobs

    jobs = RayJobs(ray_cluster, cache_ttl=30)
    calls: list[str] = []
    real = jobs._call

    def counted(name, *args, **kwargs):  # the real call, counted
        calls.append(name)
        time.sleep(0.5)  # a busy dashboard
        return real(name, *args, **kwargs)

    jobs._call = counted
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(jobs.info("dmsae-unknown-1")))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [None] * 20  # unknown to the cluster
    assert calls == ["get_job_info"]


def test_job_gpus_only_when_the_driver_does_the_work():
    from dmsae_ray.config import RunConfig
    from dmsae_ray.service import entrypoint, job_resources

    assert job_resources(RunConfig()) == {}
    gpu = {"ray": {"use_gpu": True, "num_workers": 0}}
    assert job_resources(RunConfig.model_validate(gpu)) == {"entrypoint_num_gpus": 1}
    workers = {"ray": {"use_gpu": True, "num_workers": 2}}
    assert job_resources(RunConfig.model_validate(workers)) == {}
    assert entrypoint("/r/a b/request.json") == "dmsae run --config '/r/a b/request.json'"


def test_without_ray_the_service_is_alive_but_not_ready(tmp_path, tiny_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from api.app import Settings, create_app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # it would override ray_address
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)

    app = create_app(Settings(runs_root=tmp_path / "runs", ray_address="http://127.0.0.1:9"))
    with TestClient(app) as client:  # no token configured: open (loopback only)
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        r = client.post("/v1/distillations", json=body(tiny_dir))
        assert r.status_code == 503, r.text
        assert client.get("/v1/distillations").json()["total"] == 0
        assert not any((tmp_path / "runs").iterdir())
    assert (tmp_path / "runs.sqlite3").is_file()


# --------------------------------------------------------------------------- with Ray


def test_health_checks_and_authentication(server, api):
    anon = httpx.Client(base_url=server.url, timeout=30)
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ray_version"]
    for method, path in [
        ("GET", "/v1/distillations"),
        ("POST", "/v1/distillations"),
        ("GET", "/v1/distillations/0123456789ab"),
        ("GET", "/v1/distillations/0123456789ab/artifacts/config.json"),
        ("DELETE", "/v1/distillations/0123456789ab"),
    ]:
        r = anon.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        r = anon.request(method, path, headers={"Authorization": "Bearer wrong-token"})
        assert r.status_code == 403, (method, path, r.text)
        r = anon.request(method, path, headers={"Authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401
    assert api.get("/v1/distillations").json()["total"] == 0
    assert anon.get("/docs").status_code == 200
    assert "/v1/distillations/{run_id}/events" in anon.get("/openapi.json").json()["paths"]


def test_invalid_requests(api, tiny_dir, server):
    def field_of(r: httpx.Response) -> list[str]:
        assert r.status_code == 422, r.text
        return [e["field"] for e in r.json()["detail"]]

    assert field_of(api.post("/v1/distillations", json=body(tiny_dir, distill={"tau": 1.5}))) == [
        "distill.tau"
    ]
    assert field_of(api.post("/v1/distillations", json=body(tiny_dir, sae={"widht": 4}))) == [
        "sae.widht"
    ]
    assert field_of(
        api.post("/v1/distillations", json=body(tiny_dir) | {"run_dir": "/tmp/elsewhere"})
    ) == ["run_dir"]
    assert field_of(
        api.post("/v1/distillations", json=body(tiny_dir, distill={"init_core": "/etc"}))
    ) == ["distill.init_core"]
    r = api.post(
        "/v1/distillations", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422
    big = body(tiny_dir) | {"padding": "x" * (2 << 20)}
    assert api.post("/v1/distillations", json=big).status_code == 413

    def chunks():
        yield b'{"model": {"name": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}}'

    r = api.post(
        "/v1/distillations", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413
    for path in (
        "/v1/distillations/0123456789ab",
        "/v1/distillations/nope",
        "/v1/distillations/0123456789ab/cycles/0",
        "/v1/distillations/0123456789ab/artifacts",
    ):
        assert api.get(path).status_code == 404, path
    assert api.get("/v1/distillations", params={"status": "bogus"}).status_code == 422
    assert api.get("/v1/distillations").json()["total"] == 0
    assert not any((server.root / "runs").iterdir())


def test_submit_is_idempotent(api, tiny_dir, runs):
    cfg = body(tiny_dir, distill={"cycles": 1})
    key = {"Idempotency-Key": "submit-main-1", "X-Submitter": "tester"}
    r = api.post("/v1/distillations", json=cfg, headers=key)
    assert r.status_code == 201, r.text
    run = r.json()
    assert r.headers["location"] == f"/v1/distillations/{run['id']}"
    assert run["status"] in ("pending", "running") and run["submitter"] == "tester"
    assert run["ray_job_id"] == f"dmsae-{run['id']}-1" and run["cycles_total"] == 2
    runs["main"] = run["id"]
    again = api.post("/v1/distillations", json=cfg, headers=key)
    assert again.status_code == 200 and again.json()["id"] == run["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = api.post("/v1/distillations", json=body(tiny_dir), headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.text
    page = api.get("/v1/distillations").json()
    assert page["total"] == 1 and page["items"][0]["id"] == run["id"]


STOP_CYCLES = 3


def test_stop_resume_and_limits(api, tiny_dir, runs):
    # The second run: cycle 0 plus 3 more, each training 2^20 tokens (seconds, where the
    # tiny default trains in a tenth of one): long enough to be seen and stopped part-way.
    slow = {"tokens_per_cycle": 2**20, "log_every": 500, "checkpoint_every": 1000}
    r = api.post(
        "/v1/distillations", json=body(tiny_dir, distill={"cycles": STOP_CYCLES}, train=slow)
    )
    assert r.status_code == 201, r.text
    rid = runs["stop"] = r.json()["id"]
    # Two runs are active and the cap is 2: a third waits.
    third = api.post("/v1/distillations", json=body(tiny_dir, distill={"cycles": 0}))
    assert third.status_code == 429 and third.headers["retry-after"]
    assert api.get("/v1/distillations").json()["total"] == 2
    # Active runs cannot be deleted or resumed.
    assert api.delete(f"/v1/distillations/{rid}").status_code == 409
    assert api.post(f"/v1/distillations/{rid}/resume").status_code == 409

    # Stop once cycle 0 is committed, resume, and the run finishes without redoing cycle 0.
    view = wait_for(
        api, rid, lambda v: v["cycle"] >= 1 or v["status"] not in ("pending", "running"), every=0.2
    )
    assert view["status"] == "running" and 1 <= view["cycle"] <= STOP_CYCLES, view
    stop = api.post(f"/v1/distillations/{rid}/stop")
    assert stop.status_code == 202, stop.text
    stopped = wait_for(api, rid, lambda v: v["status"] == "stopped", timeout=60)
    assert stopped["ray_job"]["status"] == "STOPPED"
    assert api.post(f"/v1/distillations/{rid}/stop").status_code == 200  # idempotent
    assert 1 <= stopped["cycle"] <= STOP_CYCLES, stopped  # committed some, not all
    assert stopped["cycle"] == len(stopped["cycles"])
    first_cycle = stopped["cycles"][0]

    r = api.post(f"/v1/distillations/{rid}/resume")
    assert r.status_code == 202, r.text
    assert r.json()["job_ids"] == [f"dmsae-{rid}-1", f"dmsae-{rid}-2"]
    assert r.json()["status"] in ("pending", "running")

    # 50 status requests at once while the resumed run is active: every one answers.
    results: list[tuple[int, str]] = []

    def get() -> None:
        got = api.get(f"/v1/distillations/{rid}")
        results.append((got.status_code, got.json().get("status")))

    threads = [threading.Thread(target=get) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [code for code, _ in results] == [200] * 50
    assert {status for _, status in results} <= {"pending", "running"}
    # The event stream follows the resumed run to its end.
    events = read_events(api, f"/v1/distillations/{rid}/events")
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "end" and events[-1]["data"]["status"] == "completed", events[-3:]
    statuses = [e["data"]["status"] for e in events if e["event"] == "progress"]
    assert "running" in statuses and statuses[-1] == "completed"
    cycles = list(range(STOP_CYCLES + 1))
    assert [e["data"]["cycle"] for e in events if e["event"] == "cycle"] == cycles
    stages = {e["data"]["stage"] for e in events if e["event"] == "progress"}
    assert len(stages) > 1  # progress as it happens, not one final snapshot

    done = api.get(f"/v1/distillations/{rid}").json()
    assert done["status"] == "completed" and done["cycle"] == len(cycles) and not done["error"]
    assert done["cycles"][0] == first_cycle  # committed before the stop, not recomputed
    logs = api.get(f"/v1/distillations/{rid}/logs")
    assert logs.status_code == 200 and "resuming" in logs.text
    first = api.get(f"/v1/distillations/{rid}/logs", params={"attempt": 1, "tail": 200})
    assert first.status_code == 200 and "[cycle 0]" in first.text
    assert api.get(f"/v1/distillations/{rid}/logs", params={"attempt": 3}).status_code == 404
    assert api.post(f"/v1/distillations/{rid}/resume").status_code == 409
    assert api.post(f"/v1/distillations/{rid}/stop").status_code == 409


def test_first_run_completes_with_metrics(api, runs):
    rid = runs["main"]
    view = wait_for(api, rid, lambda v: v["status"] in ("completed", "failed", "stopped"))
    assert view["status"] == "completed", api.get(f"/v1/distillations/{rid}/logs").text
    assert view["ray_job"]["status"] == "SUCCEEDED"
    assert [c["cycle"] for c in view["cycles"]] == [0, 1]
    for c in view["cycles"]:
        assert c["core_size"] > 0 and 0 < c["eval"]["l0"]
        assert "explained_variance" in c["eval"] and "ce_loss_score" in c["eval"]
    assert view["cycles"][0]["jaccard"] is None and 0 <= view["cycles"][1]["jaccard"] <= 1
    assert view["core_size"] == view["cycles"][1]["core_size"]
    cycle = api.get(f"/v1/distillations/{rid}/cycles/1").json()
    assert cycle["summary"]["core_size"] == len(cycle["core"]["indices"])
    assert "candidate_scores" not in cycle["core"] and cycle["metrics"]
    full = api.get(f"/v1/distillations/{rid}/cycles/1", params={"full": True}).json()
    assert len(full["core"]["candidate_scores"]) > 0
    assert api.get(f"/v1/distillations/{rid}/cycles/2").status_code == 404
    listing = api.get("/v1/distillations", params={"status": "completed"}).json()
    assert {i["id"] for i in listing["items"]} == {runs["main"], runs["stop"]}
    assert api.get("/v1/distillations", params={"status": "running"}).json()["total"] == 0
    page = api.get("/v1/distillations", params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["total"] == 2 and page["next_offset"] == 1
    # A terminal run streams one snapshot and ends.
    with api.stream("GET", f"/v1/distillations/{rid}/events") as s:
        text = "".join(s.iter_text())
    assert text.rstrip().splitlines()[-2] == "event: end"


def test_artifacts_download_and_confinement(api, runs, server):
    from safetensors.torch import load

    rid = runs["main"]
    items = api.get(f"/v1/distillations/{rid}/artifacts").json()["items"]
    paths = {i["path"] for i in items}
    for p in (
        "config.json",
        "state.json",
        "cycles/000/sae/sae_weights.safetensors",
        "cycles/000/sae/cfg.json",
        "cycles/001/core.json",
        "core/core.json",
        "core/encoder.safetensors",
    ):
        assert p in paths, (p, sorted(paths))
    r = api.get(f"/v1/distillations/{rid}/artifacts/cycles/000/sae/sae_weights.safetensors")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    tensors = load(r.content)
    sae_cfg = api.get(f"/v1/distillations/{rid}/artifacts/cycles/000/sae/cfg.json").json()
    assert tensors["W_enc"].shape == (sae_cfg["d_in"], sae_cfg["d_sae"])
    assert tensors["W_dec"].shape == (sae_cfg["d_sae"], sae_cfg["d_in"])

    # Confinement: '..' and absolute paths are 400, anything leading out of the run dir 404.
    run_dir = server.root / "runs" / rid
    outside = server.root / "secret.txt"
    outside.write_text("not yours")
    (run_dir / "escape.txt").symlink_to(outside)
    (run_dir / "escape_dir").symlink_to(server.root)
    (run_dir / "inside.json").symlink_to(run_dir / "config.json")
    (run_dir / "cycles" / ".001.tmp").mkdir()
    (run_dir / "cycles" / ".001.tmp" / "x.json").write_text("{}")
    base = f"/v1/distillations/{rid}/artifacts/"
    for path, code in [
        ("..%2F..%2Fsecret.txt", 400),
        ("..%2Fsecret.txt", 400),
        ("%2E%2E/%2E%2E/secret.txt", 400),
        ("cycles/..%2F..%2F..%2Fsecret.txt", 400),
        ("%2Fetc%2Fpasswd", 400),
        ("/etc/passwd", 400),
        ("cycles%5C..%5C..%5Csecret.txt", 400),
        ("escape.txt", 404),
        ("escape_dir/secret.txt", 404),
        ("cycles/.001.tmp/x.json", 404),
        ("nope.bin", 404),
        ("cycles", 404),
        ("..%252F..%252Fsecret.txt", 404),
    ]:
        r = api.get(base + path)
        assert r.status_code == code, (path, r.status_code, r.text)
        assert "not yours" not in r.text
    # Unnormalised '..' segments sent verbatim (httpx would resolve them client-side).
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for raw in (base + "../../secret.txt", base + "cycles/../../../secret.txt"):
        conn.request("GET", raw, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        assert resp.status in (400, 404) and b"not yours" not in resp.read(), raw
    conn.close()
    assert api.get(base + "inside.json").json() == api.get(base + "config.json").json()
    paths = {i["path"] for i in api.get(f"/v1/distillations/{rid}/artifacts").json()["items"]}
    assert "inside.json" in paths
    assert not {"escape.txt", "escape_dir/secret.txt", "cycles/.001.tmp/x.json"} & paths


def test_restarted_server_serves_earlier_runs(server, api, runs, tiny_dir, tmp_path):
    before = {i["id"]: i for i in api.get("/v1/distillations").json()["items"]}
    server.stop()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server.start(token_file=token_file)
    after = {i["id"]: i for i in api.get("/v1/distillations").json()["items"]}
    assert after.keys() == before.keys() == {runs["main"], runs["stop"]}
    for rid, item in after.items():
        assert item["status"] == before[rid]["status"] == "completed"
        assert item["created_at"] == before[rid]["created_at"]
        view = api.get(f"/v1/distillations/{rid}").json()
        assert view["cycles"] and view["ray_job_id"] == before[rid]["ray_job_id"]
    r = api.get(f"/v1/distillations/{runs['main']}/artifacts/core/core.json")
    assert r.status_code == 200 and r.json()["ids"]
    assert api.get("/v1/distillations", headers={"Authorization": "Bearer x"}).status_code == 403
    # The idempotency key survives the restart too.
    again = api.post(
        "/v1/distillations",
        json=body(tiny_dir, distill={"cycles": 1}),
        headers={"Idempotency-Key": "submit-main-1"},
    )
    assert again.status_code == 200 and again.json()["id"] == runs["main"]
    # Deleting a finished run removes its record and its directory.
    run_dir = server.root / "runs" / runs["stop"]
    assert run_dir.is_dir()
    assert api.delete(f"/v1/distillations/{runs['stop']}").status_code == 204
    assert api.get(f"/v1/distillations/{runs['stop']}").status_code == 404
    assert not run_dir.exists()
    assert api.get("/v1/distillations").json()["total"] == 1


def test_no_token_means_loopback_only(tmp_path):
    env = _env()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmsae_ray.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--runs-root",
            str(tmp_path / "runs"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "refusing" in out.stderr
    assert not (tmp_path / "runs").exists()
