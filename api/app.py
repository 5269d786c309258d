"""The REST service: submit distillations as Ray jobs, follow them, fetch their artefacts.

``create_app(Settings(...))`` builds the FastAPI application; ``dmsae serve`` runs it under
uvicorn (``api/server.py``). This module maps HTTP onto ``api/runs.py`` (distillations) and
``api/sweeps.py``; every Ray interaction and every read of a run directory goes through
``dmsae_ray.service``; the service's own record of runs is SQLite (``api/store.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from api.models import (
    ArtifactList,
    CycleDetail,
    Distillation,
    DistillationPage,
    Health,
    Ready,
    Status,
)
from api.policy import Rejected
from api.runs import (
    Runs,
    Settings,
    corpus_tokens,
    http_error,
    refuse_tokens,
    validation_error,
)
from api.security import BearerAuth, BodyLimitMiddleware, HostCheckMiddleware
from api.sweeps import SweepNotFound, SweepRequest, Sweeps, iter_errors, sweeps_root
from api.ui import mount_ui
from dmsae_ray import service
from dmsae_ray.config import RunConfig
from dmsae_ray.sweep_plan import SweepError

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
Submitter = Annotated[str | None, Header(alias="X-Submitter", max_length=200)]


def _submitted(view: dict, created: bool, location: str) -> JSONResponse:
    """201 with Location for a new run or sweep; 200 for an idempotent retry's first one."""
    if created:
        return JSONResponse(status_code=201, content=jsonable_encoder(view),
                            headers={"Location": location})
    return JSONResponse(status_code=200, content=jsonable_encoder(view),
                        headers={"Idempotent-Replayed": "true"})


def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors())
    for e in errors:
        loc = [str(p) for p in e.get("loc", [])]
        e["field"] = ".".join(loc[1:] if loc and loc[0] == "body" else loc) or "body"
        e.pop("input", None)
        e.pop("url", None)
    return JSONResponse(status_code=422, content={"detail": errors})


def create_app(settings: Settings) -> FastAPI:
    runs = Runs(settings)
    auth = BearerAuth(settings.token)
    app = FastAPI(
        title="dmsae-ray",
        version="1",
        description=(
            "Distilled Matryoshka SAE runs as Ray jobs. Every /v1 endpoint needs "
            "`Authorization: Bearer <token>` when the server has a token (or the web UI's "
            "session cookie, see /ui/). The web UI is at /ui/."
        ),
    )
    app.state.runs = runs
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.token is None:  # open on loopback: refuse other Host names (DNS rebinding)
        app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    from fastapi.security import HTTPBearer

    bearer_doc = HTTPBearer(auto_error=False)  # only so that /docs shows an Authorize button
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_doc), Depends(auth)])

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> dict:
        """The process is up (no authentication)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, tags=["health"],
             responses={503: {"model": Ready}})
    def readyz() -> Any:
        """The Ray job server answers (no authentication)."""
        try:
            return {"status": "ready", "ray_version": runs.jobs.ping()}
        except service.ServiceError as err:
            return JSONResponse(
                status_code=503, content={"status": "unavailable", "detail": str(err)}
            )

    @v1.post("/distillations", status_code=201, response_model=Distillation,
             tags=["distillations"])
    def create(
        cfg: RunConfig,
        request: Request,
        idempotency_key: IdempotencyKey = None,
        submitter: Submitter = None,
    ) -> Any:
        """Start a distillation (the body is a run config; `run_dir` is chosen by the server).
        A retry with the same `Idempotency-Key` returns the first run (200) instead."""
        who = submitter or (request.client.host if request.client else None)
        rec, created = runs.create(cfg, idempotency_key, who)
        view = runs.view(runs.record(rec.id))
        return _submitted(view, created, f"/v1/distillations/{rec.id}")

    @v1.get("/distillations", response_model=DistillationPage, tags=["distillations"])
    def list_runs(
        status: Status | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict:
        """Runs, newest first, optionally only those with a given status."""
        return runs.list(status, limit, offset)

    @v1.get("/distillations/{run_id}", response_model=Distillation, tags=["distillations"])
    def get_run(run_id: str) -> dict:
        """Status, current cycle and stage, progress, per-cycle core size / Jaccard / metrics,
        Ray job."""
        return runs.view(runs.record(run_id))

    @v1.get("/distillations/{run_id}/cycles/{n}", response_model=CycleDetail,
            tags=["distillations"])
    def get_cycle(
        run_id: str,
        n: int,
        full: Annotated[
            bool, Query(description="include every candidate's id and score")
        ] = False,
    ) -> dict:
        """A committed cycle: summary, selected core (core.json), metrics, its artefacts."""
        rec = runs.record(run_id)
        detail = service.read_cycle(rec.run_dir, n) if n >= 0 else None
        if detail is None:
            raise http_error(404, f"cycle {n} of {run_id} is not committed")
        if not full and detail.get("core"):
            detail["core"] = {
                k: v for k, v in detail["core"].items() if not k.startswith("candidate_")
            }
        return detail

    @v1.get(
        "/distillations/{run_id}/events",
        tags=["distillations"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "`progress`, `cycle` and a final `end` event"}},
    )
    async def events(run_id: str) -> StreamingResponse:
        """Server-sent events: `progress` (status, cycle, stage, progress) on every change,
        `cycle` for each committed cycle, and `end` once the run is terminal."""
        runs.record(run_id)
        return StreamingResponse(
            _run_events(runs, run_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @v1.get("/distillations/{run_id}/logs", response_class=PlainTextResponse,
            tags=["distillations"])
    def logs(
        run_id: str,
        attempt: Annotated[int | None, Query(ge=1, description="1 = first job")] = None,
        tail: Annotated[int | None, Query(ge=1, description="last N lines only")] = None,
    ) -> PlainTextResponse:
        """The driver log of the run's Ray job (the latest one unless `attempt` is given)."""
        return _job_logs(runs.jobs, runs.record(run_id).job_ids, attempt, tail, f"run {run_id}")

    @v1.post("/distillations/{run_id}/stop", response_model=Distillation, status_code=202,
             tags=["distillations"])
    def stop(run_id: str) -> Any:
        """Stop the run's Ray job (202; already stopped: 200). Resume it later."""
        view, code = runs.stop(runs.record(run_id))
        return JSONResponse(status_code=code, content=jsonable_encoder(view))

    @v1.post("/distillations/{run_id}/resume", response_model=Distillation, status_code=202,
             tags=["distillations"])
    def resume(run_id: str) -> dict:
        """Submit a new Ray job on the same run directory; it resumes after the last
        committed cycle. Only for stopped or failed runs (409 otherwise)."""
        return runs.resume(runs.record(run_id))

    @v1.delete("/distillations/{run_id}", status_code=204, tags=["distillations"])
    def delete(run_id: str) -> None:
        """Delete a finished or stopped run: its record, Ray jobs and run directory (409 while
        it is active, or while another run or sweep uses its core as distill.init_core)."""
        runs.delete(
            runs.record(run_id),
            lambda run_dir: runs.core_users(run_dir) + sweeps.core_users(run_dir),
        )

    @v1.get("/distillations/{run_id}/artifacts", response_model=ArtifactList,
            tags=["artifacts"])
    def artifacts(run_id: str) -> dict:
        """Every file of the run directory (its tokens/ only with --serve-tokens)."""
        rec = runs.record(run_id)
        items = service.list_artifacts(rec.run_dir)
        if not settings.serve_tokens:
            items = [i for i in items if not corpus_tokens(i["path"].split("/"))]
        return {"items": items}

    @v1.get("/distillations/{run_id}/artifacts/{path:path}", tags=["artifacts"],
            response_class=FileResponse)
    def artifact(run_id: str, path: str) -> FileResponse:
        """Download one file (SAE safetensors, core files, report). Paths stay inside the run
        directory: absolute or '..' paths get 400, anything else outside it 404."""
        rec = runs.record(run_id)
        try:
            target = service.resolve_artifact(rec.run_dir, path)
        except service.ArtifactPathError as err:
            raise http_error(400, str(err)) from None
        except FileNotFoundError:
            raise http_error(404, f"no artifact {path!r}") from None
        refuse_tokens(settings, path, target, rec.run_dir)
        media = {".json": "application/json", ".md": "text/markdown", ".png": "image/png"}
        return FileResponse(
            target,
            media_type=media.get(target.suffix, "application/octet-stream"),
            filename=target.name,
        )

    # Sweeps (api/sweeps.py): one Ray job `dmsae sweep` per attempt; each sweep directory
    # holds its own record, so no table of the runs database is involved.
    sweeps = Sweeps(
        sweeps_root(settings.runs_root), runs.jobs, settings.max_active_sweeps,
        admission=runs.admission, lock=runs.cores,
    )
    app.state.sweeps = sweeps

    def _sweeps_call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except SweepNotFound as err:
            raise http_error(404, str(err)) from None
        except Rejected as err:
            raise validation_error(err) from None
        except SweepError as err:
            raise RequestValidationError(list(iter_errors(err))) from None
        except service.ArtifactPathError as err:
            raise http_error(400, str(err)) from None
        except FileNotFoundError:
            raise http_error(404, f"no artifact {args[-1]!r}") from None
        except service.ServiceError as err:
            raise http_error(503, str(err)) from None

    @v1.post("/sweeps", status_code=201, tags=["sweeps"])
    def create_sweep(
        req: SweepRequest,
        request: Request,
        idempotency_key: IdempotencyKey = None,
        submitter: Submitter = None,
    ) -> Any:
        """Start a sweep: a base run config plus a `sweep` section (grid, random, num_samples,
        max_concurrent_trials, ...), run as the Ray job `dmsae sweep`. Every trial's config is
        validated first: 422 names the field (e.g. `sweep.grid.distill.tau`). A retry with the
        same `Idempotency-Key` returns the first sweep (200); beyond the active-sweep cap, 429."""
        who = submitter or (request.client.host if request.client else None)
        view, created = _sweeps_call(sweeps.create, req, idempotency_key, who)
        return _submitted(view, created, f"/v1/sweeps/{view['id']}")

    @v1.get("/sweeps", tags=["sweeps"])
    def list_sweeps(
        status: Status | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict:
        """Sweeps, newest first."""
        return _sweeps_call(sweeps.list, status, limit, offset)

    @v1.get("/sweeps/{sweep_id}", tags=["sweeps"])
    def get_sweep(sweep_id: str) -> dict:
        """Status (as for distillations), the Ray job, the spec and the live summary."""
        return _sweeps_call(sweeps.view, sweep_id)

    @v1.post("/sweeps/{sweep_id}/stop", status_code=202, tags=["sweeps"])
    def stop_sweep(sweep_id: str) -> Any:
        """Stop the sweep's Ray job and with it its trials (202; already stopped: 200).
        Finished trials stay finished; resume it later."""
        view, code = _sweeps_call(sweeps.stop, sweep_id)
        return JSONResponse(status_code=code, content=jsonable_encoder(view))

    @v1.post("/sweeps/{sweep_id}/resume", status_code=202, tags=["sweeps"])
    def resume_sweep(sweep_id: str) -> dict:
        """A new Ray job on the same sweep directory: finished trials are not rerun, the
        others resume after their last committed cycle. Only stopped or failed sweeps (409)."""
        return _sweeps_call(sweeps.resume, sweep_id)

    @v1.delete("/sweeps/{sweep_id}", status_code=204, tags=["sweeps"])
    def delete_sweep(sweep_id: str) -> None:
        """Delete a finished or stopped sweep: its Ray jobs, trials and files (409 while it
        is active)."""
        _sweeps_call(sweeps.delete, sweep_id)

    @v1.get(
        "/sweeps/{sweep_id}/events",
        tags=["sweeps"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "`progress`, `trial` and a final `end` event"}},
    )
    async def sweep_events(sweep_id: str) -> StreamingResponse:
        """Server-sent events: `progress` (status, trial counts by status) on every change,
        `trial` with a trial's summary row whenever it changes (a committed cycle, its end),
        and `end` once the sweep is terminal."""
        _sweeps_call(sweeps.view, sweep_id, False)
        return StreamingResponse(
            _sweep_events(sweeps, sweep_id, settings),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @v1.get("/sweeps/{sweep_id}/logs", response_class=PlainTextResponse, tags=["sweeps"])
    def sweep_logs(
        sweep_id: str,
        attempt: Annotated[int | None, Query(ge=1, description="1 = first job")] = None,
        tail: Annotated[int | None, Query(ge=1, description="last N lines only")] = None,
    ) -> PlainTextResponse:
        """The driver log of the sweep's Ray job (the latest one unless `attempt` is given):
        Tune's trial table and every trial's progress lines."""
        job_ids = _sweeps_call(sweeps.view, sweep_id, False)["job_ids"]
        return _job_logs(runs.jobs, job_ids, attempt, tail, f"sweep {sweep_id}")

    @v1.get("/sweeps/{sweep_id}/summary", tags=["sweeps"])
    def sweep_summary(sweep_id: str) -> dict:
        """One row per trial (swept values, status, core size, Jaccard, attribution fraction,
        L0, variance explained, CE recovered, latents selected in every cycle), read from the
        trials' run directories now; `cycles` has each trial's per-cycle core size and
        Jaccard."""
        return _sweeps_call(sweeps.summary, sweep_id)

    @v1.get("/sweeps/{sweep_id}/artifacts/{path:path}", tags=["sweeps"],
            response_class=FileResponse)
    def sweep_artifact(sweep_id: str, path: str) -> FileResponse:
        """A file of the sweep directory: summary.csv/.md/.json, plots/*.png, a trial's run
        directory files (trials/<name>/...). Same path rules as a run's artifacts."""
        target = _sweeps_call(sweeps.artifact, sweep_id, path)
        refuse_tokens(settings, path, target, sweeps.root / sweep_id)
        media = {".json": "application/json", ".md": "text/markdown", ".png": "image/png",
                 ".csv": "text/csv"}
        return FileResponse(target, media_type=media.get(target.suffix,
                            "application/octet-stream"), filename=target.name)

    app.include_router(v1)
    mount_ui(app, runs, sweeps, settings, auth)  # the web UI under /ui/ (api/ui.py)
    return app


def _job_logs(
    jobs: service.RayJobs, job_ids: list[str], attempt: int | None, tail: int | None, what: str
) -> PlainTextResponse:
    if attempt is not None and attempt > len(job_ids):
        raise http_error(404, f"{what} has {len(job_ids)} job(s)")
    job_id = job_ids[(attempt or len(job_ids)) - 1]
    try:
        text = jobs.logs(job_id)
    except service.ServiceError as err:
        raise http_error(503, str(err)) from None
    if text is None:
        raise http_error(404, f"Ray has no logs for job {job_id}")
    if tail is not None:
        text = "\n".join(text.splitlines()[-tail:]) + "\n"
    return PlainTextResponse(text)


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(jsonable_encoder(data))}\n\n"


async def _follow(
    snapshot: Callable[[], dict | None],
    ident: dict[str, str],
    event: str,
    items: Callable[[dict], list[tuple[Any, dict]]],
    progress: Callable[[dict], dict],
    settings: Settings,
):
    """Server-sent events of a run or sweep: ``event`` for each keyed item (a committed cycle,
    a trial's row) that is new or changed, ``progress`` when the progress view changes, a
    keep-alive comment when nothing does, and ``end`` once the status is terminal."""
    seq, last, seen, last_sent = 0, None, {}, time.monotonic()
    while True:
        view = await asyncio.to_thread(snapshot)
        if view is None:
            yield _sse("end", ident | {"status": "deleted"})
            return
        for key, data in items(view):
            if seen.get(key) != data:
                seen[key] = data
                seq += 1
                yield _sse(event, data, seq)
        current = ident | progress(view)
        if current != last:
            seq += 1
            yield _sse("progress", current, seq)
            last, last_sent = current, time.monotonic()
        elif time.monotonic() - last_sent > settings.keepalive:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if view["status"] in service.TERMINAL:
            seq += 1
            yield _sse("end", current, seq)
            return
        await asyncio.sleep(settings.poll_interval)


def _run_events(runs: Runs, run_id: str):
    keys = ("status", "error", "cycle", "stage", "progress", "ray_job_id", "core_size")
    return _follow(
        lambda: runs.snapshot(run_id),
        {"id": run_id},
        "cycle",
        lambda view: [(c["cycle"], c) for c in view["cycles"]],
        lambda view: {k: view[k] for k in keys},
        runs.settings,
    )


def _sweep_events(sweeps: Sweeps, sweep_id: str, settings: Settings):
    def snapshot() -> dict | None:
        try:
            return sweeps.view(sweep_id)
        except SweepNotFound:
            return None

    def progress(view: dict) -> dict:
        counts = (view.get("summary") or {}).get("counts", {})
        return {k: view[k] for k in ("status", "error", "ray_job_id", "trials")} | {
            "counts": counts
        }

    return _follow(
        snapshot,
        {"id": sweep_id},
        "trial",
        lambda view: [(r["trial"], r) for r in (view.get("summary") or {}).get("rows", [])],
        progress,
        settings,
    )
