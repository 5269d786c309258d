"""The service's distillations: its record of runs (``api/store.py``) combined with their Ray
jobs and run directories (``dmsae_ray.service``), and what a request may do to them: admit,
create, stop, resume, delete. ``api/app.py`` maps HTTP onto this; ``api/ui.py`` reads it too."""

from __future__ import annotations

import re
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from api.policy import Admission, Rejected
from api.store import RunRecord, RunStore
from dmsae_ray import service
from dmsae_ray.config import RunConfig

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


def http_error(code: int, detail: Any, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(code, detail, headers=headers)


def validation_error(err: Rejected) -> RequestValidationError:
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


def refuse_tokens(settings: Settings, rel: str, target: Path, root: str | Path) -> None:
    """403 for a file of a run's tokens/ (as requested, or where a symlink leads) unless the
    operator serves them."""
    if settings.serve_tokens:
        return
    requested = tuple(p for p in rel.split("/") if p not in ("", "."))
    if corpus_tokens(requested) or corpus_tokens(target.relative_to(Path(root).resolve()).parts):
        raise http_error(403, "the corpus tokens (tokens/) are not served; the operator can allow "
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
            raise http_error(404, f"no distillation {run_id!r}")
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
            raise http_error(
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
            raise validation_error(err) from None

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
                        raise http_error(
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
                    raise http_error(503, str(err)) from None
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
            raise http_error(409, f"run {rec.id} is {view['status']}; nothing to stop")
        if not view["ray_reachable"]:
            raise http_error(503, "Ray is unreachable; cannot stop the job")
        self.store.request_stop(rec.id)
        try:
            self.jobs.stop(rec.ray_job_id or "")
        except service.ServiceError as err:
            raise http_error(503, str(err)) from None
        return self.view(self.record(rec.id)), 202

    def resume(self, rec: RunRecord) -> dict:
        with self._submit:
            rec = self.record(rec.id)
            view = self.view(rec)
            if view["status"] not in (service.STOPPED, service.FAILED):
                raise http_error(
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
                    raise http_error(503, str(err)) from None
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
                raise http_error(
                    409, f"run {rec.id} is {view['status']}; stop it before deleting it"
                )
            if not view["ray_reachable"] and not self.record(rec.id).status_final:
                # A status read from the directory alone: its job may still be running.
                raise http_error(503, "Ray is unreachable; cannot tell whether the run's job has "
                             "ended, so its directory stays")
            using = (users or self.core_users)(rec.run_dir)
            if using:
                raise http_error(
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
