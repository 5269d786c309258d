"""The service's distillations: its record of runs (``api/store.py``) combined with their Ray
jobs and run directories (``dmsae_ray.service``) into the status a caller sees, and how a run
is admitted, created (with the submission in flight marked ``pending``), stopped, resumed and
deleted. The rules a request follows are ``api/resource.py``'s, shared with sweeps;
``api/app.py`` maps HTTP onto both, ``api/ui.py`` reads them too."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.policy import Admission
from api.resource import Resource, http_error, new_id
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



class Runs(Resource[RunRecord]):
    """The distillations, on top of the store (records) and Ray (jobs)."""

    noun, plural, missing = "run", "runs", "distillation"
    retry_after = "30"
    key_reused = "Idempotency-Key already used for a different config"
    update_event = "cycle"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.runs_root.mkdir(parents=True, exist_ok=True)
        assert settings.db_path is not None
        self.store = RunStore(settings.db_path)
        super().__init__(
            service.RayJobs(
                settings.ray_address, command=settings.command, env_vars=settings.job_env
            ),
            settings.max_active_runs,
        )
        # Runs whose job is being submitted: between the record and Ray's answer the job is
        # unknown to the cluster, which must read as "pending", never as a final "failed" (a
        # DELETE would then remove the directory of a run whose job starts a moment later).
        self._submitting: set[str] = set()
        # The collections whose items may name a run's core as distill.init_core, asked before
        # a run is deleted; api/app.py adds the sweeps.
        self.core_readers: list[Resource[Any]] = [self]
        self.admission = Admission.from_options(
            settings.model_roots, settings.data_roots, settings.cache_roots, self.resolve_core
        )

    # ------------------------------------------------------------------ reading
    def find(self, ident: str) -> RunRecord | None:
        return self.store.get(ident) if RUN_ID.match(ident) else None

    def record(self, run_id: str) -> RunRecord:
        """The run's record; 404 (``NotFound``) for an unknown id."""
        return self.get(run_id)

    def ident_of(self, item: RunRecord) -> str:
        return item.id

    def items(self) -> list[RunRecord]:
        return self.store.all()

    def is_final(self, item: RunRecord) -> bool:
        return item.status_final

    def directory(self, item: RunRecord) -> Path:
        return Path(item.run_dir)

    def job_ids(self, item: RunRecord) -> list[str]:
        return item.job_ids

    def view(
        self, item: RunRecord, jobs: dict[str, service.JobInfo] | None = None,
        ray_down: bool = False, detail: bool = True,
    ) -> dict:
        """The run as the API shows it: record + state.json + Ray job, status combined."""
        rec = item
        state = service.read_state(rec.run_dir) or {}
        driver = service.driver_liveness(rec.run_dir, state)
        job, reachable = None, not ray_down
        if rec.id in self._submitting:  # its job is on its way to Ray (create or resume)
            status, error = service.PENDING, None
        elif rec.status_final:  # finished: Ray cannot change it, ask only for the job details
            status, error = rec.status, rec.error
            if detail:
                job, reachable = self._job(rec.ray_job_id, None, ray_down)
        else:
            job, reachable = self._job(rec.ray_job_id, jobs, ray_down)
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
            # state.json says running: is its driver alive (heartbeat, dmsae_ray/run/heartbeat.py)?
            "driver": None if driver is None else {
                "alive": driver.alive, "reason": driver.reason, "heartbeat_age_s": driver.age_s,
            },
            "job_ids": rec.job_ids,
            "idempotency_key": rec.idempotency_key,
            "config": cfg,
        }

    def progress(self, view: dict[str, Any]) -> dict[str, Any]:
        keys = ("status", "error", "cycle", "stage", "progress", "ray_job_id", "core_size")
        return {k: view[k] for k in keys}

    def updates(self, view: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        return [(c["cycle"], c) for c in view["cycles"]]

    def core_users(self, run_dir: str) -> list[str]:
        """Runs of this service whose distill.init_core is ``run_dir``."""
        return [
            f"run {r.id}" for r in self.store.all()
            if r.run_dir != run_dir and (r.config.get("distill") or {}).get("init_core") == run_dir
        ]

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

    def _admit(self, body: RunConfig) -> tuple[RunConfig, str]:
        cfg, _ = self.admission.check(body)
        return cfg, service.config_digest(cfg)

    def _replay(self, key: str) -> tuple[str, str | None] | None:
        old = self.store.by_idempotency_key(key)
        return None if old is None else (old.id, old.config_digest)

    def _start(
        self, admitted: RunConfig, digest: str, key: str | None, submitter: str | None
    ) -> str:
        run_id = new_id(lambda i: self.store.get(i) is not None)
        run_dir = self.settings.runs_root / run_id
        job_id = f"dmsae-{run_id}-1"
        cfg = RunConfig.model_validate(
            admitted.model_dump(mode="json") | {"run_dir": str(run_dir)}
        )
        self._submitting.add(run_id)
        try:
            rec = self.store.insert(
                run_id, cfg.model_dump(mode="json"), digest, str(run_dir), job_id,
                submitter, key, service.PENDING,
            )
            try:
                service.submit_run(self.jobs, cfg, run_dir, job_id, self._metadata(rec, 1))
            except service.ServiceError:
                self.store.delete(run_id)
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
        finally:
            self._submitting.discard(run_id)
        return run_id

    @staticmethod
    def _metadata(rec: RunRecord, attempt: int) -> dict[str, str]:
        return {
            "dmsae_run_id": rec.id,
            "attempt": str(attempt),
            "submitter": rec.submitter or "",
        }

    def _request_stop(self, item: RunRecord) -> None:
        self.store.request_stop(item.id)

    def _resubmit(self, item: RunRecord) -> None:
        attempt = len(item.job_ids) + 1
        job_id = f"dmsae-{item.id}-{attempt}"
        cfg = RunConfig.model_validate(item.config)
        # Until the new job is recorded, the record still names the previous (ended) job:
        # without this mark a concurrent DELETE would see "stopped" and remove the run.
        self._submitting.add(item.id)
        try:
            service.submit_run(
                self.jobs, cfg, item.run_dir, job_id, self._metadata(item, attempt)
            )
            self.store.new_job(item.id, job_id, service.PENDING)
        finally:
            self._submitting.discard(item.id)

    def delete(self, item: RunRecord) -> None:
        """409 also while anything (``core_readers``) names this run's core as its
        distill.init_core."""
        with self.cores:
            super().delete(item)

    def _check_delete(self, item: RunRecord, view: dict[str, Any]) -> None:
        if not view["ray_reachable"] and not self.record(item.id).status_final:
            # A status read from the directory alone: its job may still be running.
            raise http_error(503, "Ray is unreachable; cannot tell whether the run's job has "
                             "ended, so its directory stays")
        using = [u for res in self.core_readers for u in res.core_users(item.run_dir)]
        if using:
            raise http_error(
                409, f"run {item.id}'s distilled core is the distill.init_core of "
                f"{', '.join(using)}; delete {'it' if len(using) == 1 else 'them'} first",
            )

    def _remove(self, item: RunRecord) -> None:
        shutil.rmtree(item.run_dir, ignore_errors=True)
        self.store.delete(item.id)
