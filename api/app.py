"""The REST service: submit distillations and sweeps as Ray jobs, follow them, fetch their
artefacts.

``create_app(Settings(...))`` builds the FastAPI application; ``dmsae serve`` runs it under
uvicorn (``api/server.py``). Distillations (``api/runs.py``) and sweeps (``api/sweeps.py``) are
one REST resource (``api/resource.py``), whose routes ``api/routes.py`` puts under
``/v1/distillations`` and ``/v1/sweeps``; this module names and documents them, and adds what
only one has (a run's cycles and artifact list, a sweep's summary). Every Ray interaction and
every read of a run directory goes through ``dmsae_ray.service``; the service's own record of
runs is SQLite (``api/store.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.models import ArtifactList, CycleDetail, Distillation, DistillationPage, Health, Ready
from api.resource import NotFound, corpus_tokens
from api.routes import Op, register
from api.runs import Runs, Settings
from api.security import BearerAuth, BodyLimitMiddleware, HostCheckMiddleware
from api.sweeps import SweepRequest, Sweeps, sweeps_root
from api.ui import mount_ui
from dmsae_ray import service
from dmsae_ray.config import RunConfig

# How /docs names and describes the routes both collections have (api/routes.py), in the
# order it lists them.
RUN_OPS = {
    "create": Op(
        "create",
        "Start a distillation (the body is a run config; `run_dir` is chosen by the server).\n"
        "A retry with the same `Idempotency-Key` returns the first run (200) instead.",
        Distillation,
    ),
    "list": Op(
        "list_runs", "Runs, newest first, optionally only those with a given status.",
        DistillationPage,
    ),
    "get": Op(
        "get_run",
        "Status, current cycle and stage, progress, per-cycle core size / Jaccard / metrics,\n"
        "Ray job.",
        Distillation,
    ),
    "events": Op(
        "events",
        "Server-sent events: `progress` (status, cycle, stage, progress) on every change,\n"
        "`cycle` for each committed cycle, and `end` once the run is terminal.",
    ),
    "logs": Op(
        "logs",
        "The driver log of the run's Ray job (the latest one unless `attempt` is given).",
    ),
    "stop": Op(
        "stop", "Stop the run's Ray job (202; already stopped: 200). Resume it later.",
        Distillation,
    ),
    "resume": Op(
        "resume",
        "Submit a new Ray job on the same run directory; it resumes after the last\n"
        "committed cycle. Only for stopped or failed runs (409 otherwise).",
        Distillation,
    ),
    "delete": Op(
        "delete",
        "Delete a finished or stopped run: its record, Ray jobs and run directory (409 while\n"
        "it is active, or while another run or sweep uses its core as distill.init_core).",
    ),
    "artifact": Op(
        "artifact",
        "Download one file (SAE safetensors, core files, report). Paths stay inside the run\n"
        "directory: absolute or '..' paths get 400, anything else outside it 404.",
    ),
}
SWEEP_OPS = {
    "create": Op(
        "create_sweep",
        "Start a sweep: a base run config plus a `sweep` section (grid, random, num_samples,\n"
        "max_concurrent_trials, ...), run as the Ray job `dmsae sweep`. Every trial's config is\n"
        "validated first: 422 names the field (e.g. `sweep.grid.distill.tau`). A retry with the\n"
        "same `Idempotency-Key` returns the first sweep (200); beyond the active-sweep cap, 429.",
    ),
    "list": Op("list_sweeps", "Sweeps, newest first."),
    "get": Op(
        "get_sweep",
        "Status (as for distillations), the Ray job, the spec and the live summary.",
    ),
    "stop": Op(
        "stop_sweep",
        "Stop the sweep's Ray job and with it its trials (202; already stopped: 200).\n"
        "Finished trials stay finished; resume it later.",
    ),
    "resume": Op(
        "resume_sweep",
        "A new Ray job on the same sweep directory: finished trials are not rerun, the\n"
        "others resume after their last committed cycle. Only stopped or failed sweeps (409).",
    ),
    "delete": Op(
        "delete_sweep",
        "Delete a finished or stopped sweep: its Ray jobs, trials and files (409 while it\n"
        "is active).",
    ),
    "events": Op(
        "sweep_events",
        "Server-sent events: `progress` (status, trial counts by status) on every change,\n"
        "`trial` with a trial's summary row whenever it changes (a committed cycle, its end),\n"
        "and `end` once the sweep is terminal.",
    ),
    "logs": Op(
        "sweep_logs",
        "The driver log of the sweep's Ray job (the latest one unless `attempt` is given):\n"
        "Tune's trial table and every trial's progress lines.",
    ),
    "artifact": Op(
        "sweep_artifact",
        "A file of the sweep directory: summary.csv/.md/.json, plots/*.png, a trial's run\n"
        "directory files (trials/<name>/...). Same path rules as a run's artifacts.",
    ),
}


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
    # Sweeps: one Ray job `dmsae sweep` per attempt; each sweep directory holds its own
    # record, so no table of the runs database is involved.
    sweeps = Sweeps(
        sweeps_root(settings.runs_root), runs.jobs, settings.max_active_sweeps,
        admission=runs.admission, lock=runs.cores,
    )
    runs.core_readers.append(sweeps)  # a sweep may use a run's core as distill.init_core
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
    app.state.sweeps = sweeps
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

    # What only one collection has: a run's cycles and file list, a sweep's summary.
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
            raise NotFound(f"cycle {n} of {run_id} is not committed")
        if not full and detail.get("core"):
            detail["core"] = {
                k: v for k, v in detail["core"].items() if not k.startswith("candidate_")
            }
        return detail

    def artifacts(run_id: str) -> dict:
        """Every file of the run directory (its tokens/ only with --serve-tokens)."""
        rec = runs.record(run_id)
        items = service.list_artifacts(rec.run_dir)
        if not settings.serve_tokens:
            items = [i for i in items if not corpus_tokens(i["path"].split("/"))]
        return {"items": items}

    def sweep_summary(sweep_id: str) -> dict:
        """One row per trial (swept values, status, core size, Jaccard, attribution fraction,
        L0, variance explained, CE recovered, latents selected in every cycle), read from the
        trials' run directories now; `cycles` has each trial's per-cycle core size and
        Jaccard."""
        return sweeps.summary(sweep_id)

    # Each goes right after one of the common routes, where /docs has always listed it.
    register(
        v1, runs, prefix="/distillations", param="run_id", request_model=RunConfig,
        ops=RUN_OPS, tags=["distillations"], artifact_tags=["artifacts"], settings=settings,
        after={
            "get": lambda: v1.add_api_route(
                "/distillations/{run_id}/cycles/{n}", get_cycle, response_model=CycleDetail,
                tags=["distillations"],
            ),
            "delete": lambda: v1.add_api_route(
                "/distillations/{run_id}/artifacts", artifacts, response_model=ArtifactList,
                tags=["artifacts"],
            ),
        },
    )
    register(
        v1, sweeps, prefix="/sweeps", param="sweep_id", request_model=SweepRequest,
        ops=SWEEP_OPS, tags=["sweeps"], artifact_tags=["sweeps"], settings=settings,
        after={
            "logs": lambda: v1.add_api_route(
                "/sweeps/{sweep_id}/summary", sweep_summary, tags=["sweeps"]
            ),
        },
    )

    app.include_router(v1)
    mount_ui(app, runs, sweeps, settings, auth)  # the web UI under /ui/ (api/ui.py)
    return app
