"""The REST service end to end: the real app under real uvicorn (`dmsae serve` in a
subprocess) against a real local Ray cluster (`ray start --head --block` in a subprocess),
httpx as the client. The tests share one cluster, one server and two runs, and build on each
other in file order (run with -x)."""

from __future__ import annotations

import http.client
import json
import shutil
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


def roots(tiny_dir) -> list[str]:
    """The tiny model and corpus are local paths: the operator allows their directory."""
    root = str(tiny_dir["root"])
    return ["--model-root", root, "--data-root", root]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory, tiny_dir) -> Iterator[Server]:
    srv = Server(ray_cluster, tmp_path_factory.mktemp("api"), *roots(tiny_dir))
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


def test_without_ray_the_service_is_alive_but_not_ready(tmp_path, tiny_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from api.app import Settings, create_app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # it would override ray_address
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)

    app = create_app(Settings(
        runs_root=tmp_path / "runs", ray_address="http://127.0.0.1:9",
        model_roots=[str(tiny_dir["root"])], data_roots=[str(tiny_dir["root"])],
        allowed_hosts=["testserver"],  # TestClient's Host header
    ))
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


def test_readyz_reports_the_clusters_ray_version(server):
    import ray

    ready = httpx.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 200
    assert ready.json()["ray_version"] == ray.__version__  # "2.x.y", not the job API's "4"


def test_where_data_comes_from_and_number_limits(api, tiny_dir, server):
    """model.name, data.dataset, data.activation_cache, ray.address, non-finite numbers and
    sizes over the limits: 422 naming the field, for distillations and for sweeps alike."""
    link = tiny_dir["root"] / "escape-link"
    link.symlink_to(server.root)  # inside an allowed root, leading out of it
    ok_model, ok_data = str(tiny_dir["model"]), str(tiny_dir["corpus"])

    def fields(r: httpx.Response) -> list[str]:
        assert r.status_code == 422, r.text
        return [e["field"] for e in r.json()["detail"]]

    def post(path: str, data: dict) -> httpx.Response:  # NaN and Infinity as JSON allows
        return api.post(path, content=json.dumps(data),
                        headers={"Content-Type": "application/json"})

    try:
        root = str(tiny_dir["root"])
        for bad in ("/etc", "/etc/passwd", "../model", "~/model", ".hidden/model", "a/../b",
                    f"{root}/../model", str(link / "runs"), str(server.root), "a/b/c", "gemma"):
            assert fields(post("/v1/distillations", body(tiny_dir, model={"name": bad}))) == [
                "model.name"], bad
            assert fields(post("/v1/distillations", body(tiny_dir, data={"dataset": bad}))) == [
                "data.dataset"], bad
        msg = post("/v1/distillations", body(tiny_dir, model={"name": "/etc"})).json()["detail"]
        assert "--model-root" in msg[0]["msg"] and root in msg[0]["msg"]
        cache = {"cache_activations": True, "activation_cache": str(server.root / "cache")}
        assert fields(post("/v1/distillations", body(tiny_dir, data=cache))) == [
            "data.activation_cache"]
        s3 = cache | {"activation_cache": "s3://bucket/x?endpoint_override=evil.example"}
        s3_body = body(tiny_dir, data=s3, ray={"enabled": True})  # URIs need Ray
        assert fields(post("/v1/distillations", s3_body)) == ["data.activation_cache"]
        assert fields(post("/v1/distillations", body(tiny_dir, ray={"address": "ray://x:1"}))) \
            == ["ray.address"]
        for section, values, field in [
            ("train", {"lr": float("inf")}, "train.lr"),
            ("train", {"lr": float("nan")}, "train.lr"),
            ("train", {"betas": [float("nan"), 0.999]}, "train.betas.0"),
            ("distill", {"tau": float("-inf")}, "distill.tau"),
            ("ray", {"cpus_per_worker": float("inf")}, "ray.cpus_per_worker"),
            ("sae", {"width": 2**24 + 1}, "sae.width"),
            ("train", {"tokens_per_cycle": 10**12 + 1}, "train.tokens_per_cycle"),
            ("train", {"batch_size": 2**20 + 1}, "train.batch_size"),
            ("ray", {"num_workers": 1025}, "ray.num_workers"),
            ("data", {"context_length": 131_073}, "data.context_length"),
            ("distill", {"cycles": 1001}, "distill.cycles"),
        ]:
            assert fields(post("/v1/distillations", body(tiny_dir, **{section: values}))) == [
                field], field

        # Sweeps: the same rules on the base config, and on every value a grid or a choice
        # gives a guarded key.
        def sweep(grid=None, random=None, **sections) -> dict:
            spec = {"grid": grid or {"distill.tau": [0.5, 0.9]}} | (
                {"random": random} if random else {})
            return body(tiny_dir, **sections) | {"sweep": spec}

        for sections, field in [
            ({"model": {"name": "/etc"}}, "model.name"),
            ({"data": {"dataset": "../x"}}, "data.dataset"),
            ({"data": cache}, "data.activation_cache"),
            ({"ray": {"address": "ray://x:1"}}, "ray.address"),
            ({"distill": {"init_core": "/etc"}}, "distill.init_core"),
            ({"distill": {"init_core": "0123456789ab"}}, "distill.init_core"),
            ({"train": {"lr": float("inf")}}, "train.lr"),
            ({"sae": {"width": 2**25}}, "sae.width"),
        ]:
            assert fields(post("/v1/sweeps", sweep(**sections))) == [field], field
        for grid, field in [
            ({"model.name": [ok_model, "/etc"]}, "sweep.grid.model.name"),
            ({"data": {"dataset": [ok_data, str(link / "x.jsonl")]}}, "sweep.grid.data.dataset"),
            ({"ray.address": ["ray://x:1"]}, "sweep.grid.ray.address"),
            ({"distill.init_core": ["0123456789ab"]}, "sweep.grid.distill.init_core"),
            ({"data.activation_cache": ["/tmp/c"]}, "sweep.grid.data.activation_cache"),
            ({"train.lr": [1e-3, float("inf")]}, "sweep.grid.train.lr"),
            ({"ray.num_workers": [1, 5000]}, "sweep.grid.ray.num_workers"),
        ]:
            r = post("/v1/sweeps", sweep(grid=grid))
            assert fields(r) == [field], (field, r.text)
        r = post("/v1/sweeps", sweep(grid={"model.name": [ok_model, "/etc"]}))
        assert "'/etc' is invalid: model.name: must be" in r.json()["detail"][0]["msg"]
        for random, field in [
            ({"data.dataset": {"choice": [ok_data, "/etc/passwd"]}}, "sweep.random.data.dataset"),
            ({"model.name": {"uniform": [0, 1]}}, "sweep.random.model.name"),
            ({"train.lr": {"uniform": [0, float("inf")]}}, "sweep.random.train.lr"),
        ]:
            assert field in fields(post("/v1/sweeps", sweep(random=random))), field
        spec = sweep() | {"sweep": {"grid": {"distill.tau": [0.5]}, "cpus_per_trial": float("inf")}}
        assert fields(post("/v1/sweeps", spec)) == ["sweep.cpus_per_trial"]
    finally:
        link.unlink()
    assert api.get("/v1/distillations").json()["total"] == 0
    assert api.get("/v1/sweeps").json()["total"] == 0
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
    # The second run: cycle 0 plus 3 more, each training 2^19 tokens (seconds, where the
    # tiny default trains in a tenth of one): long enough to be seen and stopped part-way.
    slow = {"tokens_per_cycle": 2**19, "log_every": 500, "checkpoint_every": 1000}
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


def test_corpus_tokens_are_served_only_when_the_operator_allows(
    api, runs, server, ray_cluster, tiny_dir
):
    """A run's tokens/ (the Ray backend's tokenised corpus) is left out of the listing and
    refused (403), also through a symlink, unless `dmsae serve --serve-tokens`."""
    rid = runs["main"]
    run_dir = server.root / "runs" / rid
    (run_dir / "tokens").mkdir()
    (run_dir / "tokens" / "blocks-00000.parquet").write_bytes(b"PAR1 tok-0042")
    (run_dir / "tokens.tmp").mkdir()
    (run_dir / "tokens.tmp" / "blocks-00000.parquet").write_bytes(b"PAR1 partial")
    (run_dir / "blocks.parquet").symlink_to(run_dir / "tokens" / "blocks-00000.parquet")
    base = f"/v1/distillations/{rid}/artifacts"
    try:
        paths = {i["path"] for i in api.get(base).json()["items"]}
        assert "config.json" in paths
        assert not {p for p in paths if p.startswith("tokens")}, paths
        for path in ("tokens/blocks-00000.parquet", "tokens.tmp/blocks-00000.parquet",
                     "./tokens//blocks-00000.parquet", "blocks.parquet"):
            r = api.get(f"{base}/{path}")
            assert r.status_code == 403 and "--serve-tokens" in r.text, (path, r.text)
            assert b"tok-0042" not in r.content
        assert api.get(f"{base}/config.json").status_code == 200

        other = Server(ray_cluster, server.root, *roots(tiny_dir), "--serve-tokens")
        other.start()
        try:
            with httpx.Client(base_url=other.url, timeout=60,
                              headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                paths = {i["path"] for i in client.get(base).json()["items"]}
                assert "tokens/blocks-00000.parquet" in paths
                r = client.get(f"{base}/tokens/blocks-00000.parquet")
                assert r.status_code == 200 and r.content == b"PAR1 tok-0042"
        finally:
            other.stop()
    finally:
        (run_dir / "blocks.parquet").unlink()
        shutil.rmtree(run_dir / "tokens")
        shutil.rmtree(run_dir / "tokens.tmp")


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


def test_a_core_in_use_is_not_deleted(api, runs, tiny_dir, server):
    """A run whose distilled core another run or a sweep names as distill.init_core (by id;
    a sweep's grid values are checked and rewritten like a run's) cannot be deleted: 409
    naming them, until they are gone."""
    main = runs["main"]
    main_dir = str(server.root / "runs" / main)
    r = api.post("/v1/distillations", json=body(tiny_dir, distill={"cycles": 0,
                                                                   "init_core": main}))
    assert r.status_code == 201, r.text
    dep = r.json()["id"]
    assert r.json()["config"]["distill"]["init_core"] == main_dir
    grid = {"distill.init_core": [main], "distill.tau": [0.9]}
    r = api.post("/v1/sweeps", json=body(tiny_dir, distill={"cycles": 0}) | {"sweep": {
        "grid": grid}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    plan = api.get(f"/v1/sweeps/{sid}/artifacts/sweep.json").json()
    assert [t["params"]["distill.init_core"] for t in plan["trials"]] == [main_dir]

    r = api.delete(f"/v1/distillations/{main}")
    assert r.status_code == 409, r.text
    assert f"run {dep}" in r.json()["detail"] and f"sweep {sid}" in r.json()["detail"]
    assert api.get(f"/v1/distillations/{main}").status_code == 200

    assert api.post(f"/v1/sweeps/{sid}/stop").status_code in (200, 202)
    assert api.post(f"/v1/distillations/{dep}/stop").status_code in (200, 202, 409)
    wait_for(api, dep, lambda v: v["status"] in ("completed", "failed", "stopped"), timeout=120)
    deadline = time.monotonic() + 120
    while api.get(f"/v1/sweeps/{sid}").json()["status"] not in ("completed", "failed",
                                                                 "stopped"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert api.delete(f"/v1/sweeps/{sid}").status_code == 204
    r = api.delete(f"/v1/distillations/{main}")
    assert r.status_code == 409 and f"run {dep}" in r.json()["detail"]
    assert f"sweep {sid}" not in r.json()["detail"]
    assert api.delete(f"/v1/distillations/{dep}").status_code == 204
    assert api.delete(f"/v1/distillations/{main}").status_code == 204
    assert api.get("/v1/distillations").json()["total"] == 0


def test_without_a_token_the_host_header_is_checked(ray_cluster, tmp_path, api):
    """An open (loopback, no token) server answers only Host names of this machine and the
    operator's --allowed-host values: a page of another site rebound to 127.0.0.1 gets 400."""
    srv = Server(ray_cluster, tmp_path, "--allowed-host", "dmsae.internal")
    srv.start(token=False)
    try:
        port = srv.port
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}",
                         f"[::1]:{port}", "dmsae.internal", f"DMSAE.internal:{port}"):
                r = client.get("/v1/distillations", headers={"Host": host})
                assert r.status_code == 200, (host, r.text)
            for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example",
                         "127.0.0.2", "127.0.0.1.nip.io", f"[::2]:{port}", ""):
                for path in ("/v1/distillations", "/healthz", "/docs"):
                    r = client.get(path, headers={"Host": host})
                    assert r.status_code == 400, (host, path, r.text)
    finally:
        srv.stop()
    # With a token the token decides, whatever the Host.
    assert api.get("/v1/distillations", headers={"Host": "evil.example"}).status_code == 200


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
