"""The REST service: submit distillations as Ray jobs, follow them, fetch their artefacts.

``create_app(Settings(...))`` builds the FastAPI application; ``dmsae serve`` runs it under
uvicorn (``api/server.py``). Every Ray interaction and every read of a run directory goes
through ``dmsae_ray.service``; the service's own record of runs is SQLite (``api/store.py``).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
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
from api.policy import Admission, Rejected
from api.security import BearerAuth, BodyLimitMiddleware, HostCheckMiddleware
from api.store import RunRecord, RunStore
from api.sweeps import SweepNotFound, SweepRequest, Sweeps, iter_errors, sweeps_root
from api.ui import mount_ui
from dmsae_ray import service
from dmsae_ray.config import RunConfig
from dmsae_ray.sweep_plan import SweepError

RUN_ID = re.compile(r"^[0-9a-f]{12}$")


@dataclass
class Settings:
    runs_root: Path
    # The Ray dashboard, e.g. http://127.0.0.1:8265. None: $RAY_API_SERVER_ADDRESS or
    # $RAY_ADDRESS, else a local cluster (JobSubmissionClient's rules; $RAY_API_SERVER_ADDRESS
    # and $RAY_ADDRESS override this too, which is why `dmsae serve` sets the first).
    ray_address: str | None = None
    token: str | None = None
    db_path: Path | None = None  # default: <runs_root>.sqlite3, next to the runs root
    max_active_runs: int = 4
    max_active_sweeps: int = 2
    max_body_bytes: int = 1 << 20
    command: str = "dmsae"  # the entrypoint executable, on the PATH of whoever started Ray
    poll_interval: float = 0.5  # seconds between state reads of an event stream
    keepalive: float = 15.0  # seconds between SSE comments when nothing changes
    job_env: dict[str, str] = field(default_factory=lambda: dict(service.STOP_ENV))
    # Where a caller's model.name / data.dataset may point besides hub ids and built-in names,
    # and where data.activation_cache may live (directories or URI prefixes): none by default.
    model_roots: list[str] = field(default_factory=list)
    data_roots: list[str] = field(default_factory=list)
    cache_roots: list[str] = field(default_factory=list)
    serve_tokens: bool = False  # serve a run's tokens/ (the tokenised corpus) as artifacts
    # Host headers accepted besides localhost, 127.0.0.1 and [::1] when there is no token.
    allowed_hosts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs_root = Path(self.runs_root).expanduser().resolve()
        if self.db_path is None:
            self.db_path = self.runs_root.with_name(self.runs_root.name + ".sqlite3")


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
Submitter = Annotated[str | None, Header(alias="X-Submitter", max_length=200)]


def _submitted(view: dict, created: bool, location: str) -> JSONResponse:
    """201 with Location for a new run or sweep; 200 for an idempotent retry's first one."""
    if created:
        return JSONResponse(status_code=201, content=jsonable_encoder(view),
                            headers={"Location": location})
    return JSONResponse(status_code=200, content=jsonable_encoder(view),
                        headers={"Idempotent-Replayed": "true"})


def _error(code: int, detail: Any, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(code, detail, headers=headers)


def _rejected(err: Rejected) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ["body", *loc], "msg": msg} for loc, msg in err.errors]
    )


# A run directory's tokenised corpus (the Ray backend's tokens/, and its temporary
# tokens.tmp/): served only with `dmsae serve --serve-tokens`.
TOKEN_DIRS = ("tokens", "tokens.tmp")


def corpus_tokens(parts: tuple[str, ...] | list[str]) -> bool:
    """``parts`` (relative to a run or sweep directory) lie in a run's tokens directory."""
    parts = tuple(parts)
    if parts[:1] and parts[0] in TOKEN_DIRS:
        return True
    return len(parts) > 2 and parts[0] == "trials" and parts[2] in TOKEN_DIRS


def _refuse_tokens(settings: Settings, rel: str, target: Path, root: str | Path) -> None:
    """403 for a file of a run's tokens/ (as requested, or where a symlink leads) unless the
    operator serves them."""
    if settings.serve_tokens:
        return
    requested = tuple(p for p in rel.split("/") if p not in ("", "."))
    if corpus_tokens(requested) or corpus_tokens(target.relative_to(Path(root).resolve()).parts):
        raise _error(403, "the corpus tokens (tokens/) are not served; the operator can allow "
                     "it with dmsae serve --serve-tokens")


class Runs:
    """What the endpoints do, on top of the store (records) and Ray (jobs)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.runs_root.mkdir(parents=True, exist_ok=True)
        assert settings.db_path is not None
        self.store = RunStore(settings.db_path)
        self.jobs = service.RayJobs(
            settings.ray_address, command=settings.command, env_vars=settings.job_env
        )
        self._submit = threading.Lock()  # serialises the cap check, idempotency and submission
        # Runs whose job is being submitted: between the record and Ray's answer the job is
        # unknown to the cluster, which must read as "pending", never as a final "failed" (a
        # DELETE would then remove the directory of a run whose job starts a moment later).
        self._submitting: set[str] = set()
        # Held by every submission (runs and sweeps) and every delete: a run's distilled core
        # cannot go while a request naming it as distill.init_core is admitted.
        self.cores = threading.RLock()
        self.admission = Admission.from_options(
            settings.model_roots, settings.data_roots, settings.cache_roots, self.resolve_core
        )

    # ------------------------------------------------------------------ reading
    def record(self, run_id: str) -> RunRecord:
        rec = self.store.get(run_id) if RUN_ID.match(run_id) else None
        if rec is None:
            raise _error(404, f"no distillation {run_id!r}")
        return rec

    def view(
        self, rec: RunRecord, jobs: dict[str, service.JobInfo] | None = None,
        ray_down: bool = False, detail: bool = True,
    ) -> dict:
        """The run as the API shows it: record + state.json + Ray job, status combined.
        ``jobs``: every job of the cluster, when the caller fetched them in one call."""
        state = service.read_state(rec.run_dir) or {}
        driver = service.driver_liveness(rec.run_dir, state)
        job, reachable = None, not ray_down
        if rec.id in self._submitting:  # its job is on its way to Ray (create or resume)
            status, error = service.PENDING, None
        elif rec.status_final:  # finished: Ray cannot change it, ask only for the job details
            status, error = rec.status, rec.error
            if detail and reachable and rec.ray_job_id:
                try:
                    job = self.jobs.info(rec.ray_job_id)
                except service.ServiceError:
                    reachable = False
        else:
            if reachable and rec.ray_job_id:
                try:
                    job = jobs.get(rec.ray_job_id) if jobs is not None else None
                    if job is None:
                        job = self.jobs.info(rec.ray_job_id)
                except service.ServiceError:
                    reachable = False
            status, error = service.run_status(
                state,
                job,
                ray_reachable=reachable,
                stop_requested=rec.stop_requested is not None,
                state_time=service.state_mtime(rec.run_dir),
                driver=driver,
            )
            final = status in service.TERMINAL and reachable
            if (status, final, error) != (rec.status, rec.status_final, rec.error):
                self.store.set_status(rec.id, status, final, error, rec.ray_job_id)
        cycles = state.get("cycles", [])
        cfg = rec.config
        return {
            "id": rec.id,
            "status": status,
            "error": error,
            "cycle": state.get("cycle", 0),
            "cycles_total": cfg.get("distill", {}).get("cycles", 0) + 1,
            "stage": state.get("stage"),
            "core_size": cycles[-1].get("core_size") if cycles else None,
            "ray_job_id": rec.ray_job_id,
            "submitter": rec.submitter,
            "created_at": rec.created_at,
            "updated_at": rec.updated_at,
            "progress": state.get("progress") or {},
            "cycles": cycles,
            "ray_job": job.as_dict() if job else None,
            "ray_reachable": reachable,
            # state.json says running: is its driver alive (heartbeat, dmsae_ray/heartbeat.py)?
            "driver": None if driver is None else {
                "alive": driver.alive, "reason": driver.reason, "heartbeat_age_s": driver.age_s,
            },
            "job_ids": rec.job_ids,
            "idempotency_key": rec.idempotency_key,
            "config": cfg,
        }

    def snapshot(self, run_id: str) -> dict | None:
        rec = self.store.get(run_id)
        return None if rec is None else self.view(rec)

    def _views(self, records: list[RunRecord]) -> list[dict]:
        jobs, down = None, False
        if any(not r.status_final for r in records):
            try:
                jobs = self.jobs.all()  # one call for all of them
            except service.ServiceError:
                down = True
        return [self.view(r, jobs, ray_down=down, detail=False) for r in records]

    def list(self, status: str | None, limit: int, offset: int) -> dict:
        views = self._views(self.store.all())
        return service.paginate(views, status, limit, offset)

    def active_count(self) -> int:
        views = self._views([r for r in self.store.all() if not r.status_final])
        return sum(v["status"] in service.ACTIVE for v in views)

    def _check_capacity(self) -> None:
        cap = self.settings.max_active_runs
        if self.active_count() >= cap:
            raise _error(
                429, f"{cap} runs are already active; retry when one finishes",
                {"Retry-After": "30"},
            )

    # ------------------------------------------------------------------ writing
    def resolve_core(self, ref: str) -> str:
        """distill.init_core may only name a completed run of this service (by id or by its
        run directory): the server does not read arbitrary directories for a client. Returns
        the run directory; ``ValueError`` says why not."""
        run_id = Path(ref).name if "/" in ref else ref
        rec = self.store.get(run_id) if RUN_ID.match(run_id) else None
        if rec is None or ("/" in ref and Path(ref).resolve() != Path(rec.run_dir)):
            raise ValueError("must be the id of a run of this service")
        if not (Path(rec.run_dir) / "core" / "encoder.safetensors").is_file():
            raise ValueError(f"run {run_id} has no distilled core yet")
        return rec.run_dir

    def admit(self, cfg: RunConfig, sweep: Any = None) -> tuple[RunConfig, Any]:
        """The one validation of distillations and sweeps (api/policy.py): 422 naming every
        refused field."""
        try:
            return self.admission.check(cfg, sweep)
        except Rejected as err:
            raise _rejected(err) from None

    def core_users(self, run_dir: str) -> list[str]:
        """Runs of this service whose distill.init_core is ``run_dir``."""
        return [
            f"run {r.id}" for r in self.store.all()
            if r.run_dir != run_dir and (r.config.get("distill") or {}).get("init_core") == run_dir
        ]

    def create(
        self, cfg: RunConfig, key: str | None, submitter: str | None
    ) -> tuple[RunRecord, bool]:
        with self.cores:
            return self._create(cfg, key, submitter)

    def _create(
        self, cfg: RunConfig, key: str | None, submitter: str | None
    ) -> tuple[RunRecord, bool]:
        cfg, _ = self.admit(cfg)
        digest = service.config_digest(cfg)
        with self._submit:
            if key is not None:
                old = self.store.by_idempotency_key(key)
                if old is not None:
                    if old.config_digest != digest:
                        raise _error(
                            422, "Idempotency-Key already used for a different config"
                        )
                    return old, False
            self._check_capacity()
            run_id = secrets.token_hex(6)
            while self.store.get(run_id) is not None:  # pragma: no cover
                run_id = secrets.token_hex(6)
            run_dir = self.settings.runs_root / run_id
            job_id = f"dmsae-{run_id}-1"
            cfg = RunConfig.model_validate(cfg.model_dump(mode="json") | {"run_dir": str(run_dir)})
            self._submitting.add(run_id)
            try:
                rec = self.store.insert(
                    run_id, cfg.model_dump(mode="json"), digest, str(run_dir), job_id,
                    submitter, key, service.PENDING,
                )
                try:
                    service.submit_run(self.jobs, cfg, run_dir, job_id, self._metadata(rec, 1))
                except service.ServiceError as err:
                    self.store.delete(run_id)
                    shutil.rmtree(run_dir, ignore_errors=True)
                    raise _error(503, str(err)) from None
            finally:
                self._submitting.discard(run_id)
            return rec, True

    @staticmethod
    def _metadata(rec: RunRecord, attempt: int) -> dict[str, str]:
        return {
            "dmsae_run_id": rec.id,
            "attempt": str(attempt),
            "submitter": rec.submitter or "",
        }

    def stop(self, rec: RunRecord) -> tuple[dict, int]:
        view = self.view(rec)
        if view["status"] == service.STOPPED:
            return view, 200
        if view["status"] in service.TERMINAL:
            raise _error(409, f"run {rec.id} is {view['status']}; nothing to stop")
        if not view["ray_reachable"]:
            raise _error(503, "Ray is unreachable; cannot stop the job")
        self.store.request_stop(rec.id)
        try:
            self.jobs.stop(rec.ray_job_id or "")
        except service.ServiceError as err:
            raise _error(503, str(err)) from None
        return self.view(self.record(rec.id)), 202

    def resume(self, rec: RunRecord) -> dict:
        with self._submit:
            rec = self.record(rec.id)
            view = self.view(rec)
            if view["status"] not in (service.STOPPED, service.FAILED):
                raise _error(
                    409, f"run {rec.id} is {view['status']}; only stopped or failed runs resume"
                )
            self._check_capacity()
            attempt = len(rec.job_ids) + 1
            job_id = f"dmsae-{rec.id}-{attempt}"
            cfg = RunConfig.model_validate(rec.config)
            # Until the new job is recorded, the record still names the previous (ended) job:
            # without this mark a concurrent DELETE would see "stopped" and remove the run.
            self._submitting.add(rec.id)
            try:
                try:
                    service.submit_run(
                        self.jobs, cfg, rec.run_dir, job_id, self._metadata(rec, attempt)
                    )
                except service.ServiceError as err:
                    raise _error(503, str(err)) from None
                self.store.new_job(rec.id, job_id, service.PENDING)
            finally:
                self._submitting.discard(rec.id)
        return self.view(self.record(rec.id))

    def delete(self, rec: RunRecord, users: Callable[[str], list[str]] | None = None) -> None:
        """``users(run_dir)``: everything else that names this run's core as its
        distill.init_core (409 while there is any)."""
        with self.cores:
            view = self.view(rec)
            if view["status"] not in service.TERMINAL:
                raise _error(409, f"run {rec.id} is {view['status']}; stop it before deleting it")
            if not view["ray_reachable"] and not self.record(rec.id).status_final:
                # A status read from the directory alone: its job may still be running.
                raise _error(503, "Ray is unreachable; cannot tell whether the run's job has "
                             "ended, so its directory stays")
            using = (users or self.core_users)(rec.run_dir)
            if using:
                raise _error(
                    409, f"run {rec.id}'s distilled core is the distill.init_core of "
                    f"{', '.join(using)}; delete {'it' if len(using) == 1 else 'them'} first",
                )
            self._delete(rec)

    def _delete(self, rec: RunRecord) -> None:
        for job_id in rec.job_ids:
            try:
                self.jobs.delete(job_id)
            except service.ServiceError:
                break  # Ray down: the jobs stay in its history, the run goes anyway
        shutil.rmtree(rec.run_dir, ignore_errors=True)
        self.store.delete(rec.id)


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
            raise _error(404, f"cycle {n} of {run_id} is not committed")
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
            raise _error(400, str(err)) from None
        except FileNotFoundError:
            raise _error(404, f"no artifact {path!r}") from None
        _refuse_tokens(settings, path, target, rec.run_dir)
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
            raise _error(404, str(err)) from None
        except Rejected as err:
            raise _rejected(err) from None
        except SweepError as err:
            raise RequestValidationError(list(iter_errors(err))) from None
        except service.ArtifactPathError as err:
            raise _error(400, str(err)) from None
        except FileNotFoundError:
            raise _error(404, f"no artifact {args[-1]!r}") from None
        except service.ServiceError as err:
            raise _error(503, str(err)) from None

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
        _refuse_tokens(settings, path, target, sweeps.root / sweep_id)
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
        raise _error(404, f"{what} has {len(job_ids)} job(s)")
    job_id = job_ids[(attempt or len(job_ids)) - 1]
    try:
        text = jobs.logs(job_id)
    except service.ServiceError as err:
        raise _error(503, str(err)) from None
    if text is None:
        raise _error(404, f"Ray has no logs for job {job_id}")
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
