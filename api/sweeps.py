"""The service's sweeps, with the conventions of its distillations: an Idempotency-Key for
retried submissions, a cap on active sweeps (429), stop, resume and delete.

Each sweep is the Ray job ``dmsae sweep --config <dir>/request.json --sweep-dir <dir>``; a
resume is the same command as a new job, which skips finished trials and resumes the others
after their last committed cycle. The record is ``record.json`` in the sweep directory, not a
database table: a restarted service lists what is on disk.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import Field

from api.policy import Admission
from dmsae_ray import service
from dmsae_ray.config import RunConfig
from dmsae_ray.sweep_plan import SweepError, SweepSpec

RECORD_FILE, REQUEST_FILE = service.SWEEP_RECORD_FILE, service.SWEEP_REQUEST_FILE
STATE_FILE, SWEEP_FILE = service.SWEEP_STATE_FILE, service.SWEEP_PLAN_FILE

SWEEP_ID_CHARS = set("0123456789abcdef")


class SweepRequest(RunConfig):
    """``POST /v1/sweeps``: a base run config (``run_dir`` left out) plus its sweep."""

    sweep: SweepSpec = Field(description="the search space; see `dmsae sweep --help`")


class SweepNotFound(LookupError):
    pass


def _conflict(code: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(code, detail, headers=headers)


def sweeps_root(runs_root: Path) -> Path:
    """Next to the runs root (``runs/api`` -> ``runs/api-sweeps``), so run ids and sweep ids
    never share a directory."""
    return runs_root.with_name(runs_root.name + "-sweeps")


def request_digest(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


class Sweeps:
    def __init__(
        self, root: str | Path, jobs: service.RayJobs, max_active: int = 2, *,
        admission: Admission | None = None, lock: AbstractContextManager | None = None,
    ) -> None:
        """``admission``: the rules every request passes (api/policy.py, shared with
        distillations); ``lock``: held while a sweep is admitted and submitted (the runs'
        lock, so that a run's core is not deleted meanwhile)."""
        self.root = Path(root).expanduser().resolve()
        self.jobs = jobs
        self.max_active = max_active
        self.admission = admission or Admission()
        self._lock = lock or nullcontext()
        self._submit = threading.Lock()  # cap check, idempotency and submission as one step

    # ------------------------------------------------------------------ records
    def _dir(self, sweep_id: str) -> Path:
        d = self.root / sweep_id
        valid = len(sweep_id) == 12 and set(sweep_id) <= SWEEP_ID_CHARS
        if not valid or not (d / RECORD_FILE).is_file():
            raise SweepNotFound(f"no sweep {sweep_id!r}")
        return d

    def _record(self, sweep_id: str) -> dict[str, Any]:
        return service.read_json(self._dir(sweep_id) / RECORD_FILE) or {}

    def _update(self, sweep_id: str, **fields: Any) -> dict[str, Any]:
        rec = self._record(sweep_id) | fields
        service.write_json(self.root / sweep_id / RECORD_FILE, rec)
        return rec

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        recs = []
        for d in self.root.iterdir():
            rec = service.read_json(d / RECORD_FILE)
            if rec:
                recs.append((rec.get("created_at", 0), d.name))
        return [i for _, i in sorted(recs, reverse=True)]

    # ------------------------------------------------------------------ reading
    def view(
        self, sweep_id: str, with_summary: bool = True,
        jobs: dict[str, service.JobInfo] | None = None,
    ) -> dict[str, Any]:
        """``jobs``: every job of the cluster, when the caller fetched them in one call."""
        d = self._dir(sweep_id)
        rec = service.read_json(d / RECORD_FILE) or {}
        state = service.read_json(d / STATE_FILE)
        job, reachable = None, True
        try:
            job = jobs.get(rec["ray_job_id"]) if jobs is not None else None
            if job is None:
                job = self.jobs.info(rec["ray_job_id"])
        except service.ServiceError:
            reachable = False
        try:
            st_time: float | None = (d / STATE_FILE).stat().st_mtime
        except FileNotFoundError:
            st_time = None
        status, error = service.run_status(
            state,
            job,
            ray_reachable=reachable,
            stop_requested=rec.get("stop_requested") is not None,
            state_time=st_time,
        )
        plan = service.read_json(d / SWEEP_FILE) or {}
        out: dict[str, Any] = {
            "id": sweep_id,
            "name": rec.get("name"),
            "status": status,
            "error": error,
            "trials": len(plan.get("trials", [])),
            "keys": plan.get("keys", []),
            "ray_job_id": rec.get("ray_job_id"),
            "ray_job": job.as_dict() if job else None,
            "ray_reachable": reachable,
            "job_ids": rec.get("job_ids", []),
            "idempotency_key": rec.get("idempotency_key"),
            "submitter": rec.get("submitter"),
            "created_at": rec.get("created_at"),
            "updated_at": (state or {}).get("updated", rec.get("created_at")),
        }
        if with_summary:
            out["spec"] = plan.get("spec")
            out["summary"] = self.summary(sweep_id) if plan else None
        return out

    def _views(self) -> list[dict[str, Any]]:
        try:
            jobs = self.jobs.all()  # one call for every sweep, not one per sweep
        except service.ServiceError:
            jobs = None
        return [self.view(i, with_summary=False, jobs=jobs) for i in self.ids()]

    def list(self, status: str | None, limit: int, offset: int) -> dict[str, Any]:
        return service.paginate(self._views(), status, limit, offset)

    def summary(self, sweep_id: str) -> dict[str, Any]:
        """Live: read from the trials' run directories now, not from the last written file."""
        plan = service.read_json(self._dir(sweep_id) / SWEEP_FILE)
        if not plan:
            raise SweepNotFound(f"sweep {sweep_id} has no plan yet")
        return service.summarize_sweep(plan)

    def artifact(self, sweep_id: str, rel: str) -> Path:
        return service.resolve_artifact(self._dir(sweep_id), rel)

    def active_count(self) -> int:
        return sum(v["status"] in service.ACTIVE for v in self._views())

    def core_users(self, run_dir: str) -> list[str]:
        """Sweeps whose base config or one of whose trials has ``run_dir`` as its
        distill.init_core."""
        out = []
        for sweep_id in self.ids():
            plan = service.read_json(self.root / sweep_id / SWEEP_FILE) or {}
            cores = {((plan.get("base") or {}).get("distill") or {}).get("init_core")}
            cores |= {(t.get("params") or {}).get("distill.init_core")
                      for t in plan.get("trials", [])}
            if run_dir in cores:
                out.append(f"sweep {sweep_id}")
        return out

    # ------------------------------------------------------------------ writing
    def _check_capacity(self) -> None:
        if self.active_count() >= self.max_active:
            raise _conflict(
                429, f"{self.max_active} sweeps are already active; retry when one finishes",
                {"Retry-After": "60"},
            )

    def _by_key(self, key: str) -> dict[str, Any] | None:
        for sweep_id in self.ids():
            rec = service.read_json(self.root / sweep_id / RECORD_FILE) or {}
            if rec.get("idempotency_key") == key:
                return rec
        return None

    def _submit_job(self, sweep_id: str, job_id: str, submitter: str | None) -> None:
        d = self.root / sweep_id
        service.submit_sweep(
            self.jobs, d / REQUEST_FILE, d, job_id,
            {"dmsae_sweep_id": sweep_id, "submitter": submitter or ""},
        )

    def create(
        self, req: SweepRequest, key: str | None, submitter: str | None
    ) -> tuple[dict[str, Any], bool]:
        """(view, created): a retry with the same Idempotency-Key returns the first sweep.
        Raises ``policy.Rejected`` for what the service's rules refuse (as for a
        distillation), ``SweepError`` for an invalid sweep."""
        with self._lock:
            return self._create(req, key, submitter)

    def _create(
        self, req: SweepRequest, key: str | None, submitter: str | None
    ) -> tuple[dict[str, Any], bool]:
        base, sweep = self.admission.check(req, req.sweep)
        assert sweep is not None
        digest = request_digest(req.model_dump(mode="json", exclude_defaults=True))
        with self._submit:
            if key is not None:
                old = self._by_key(key)
                if old is not None:
                    if old.get("request_digest") != digest:
                        raise _conflict(422, "Idempotency-Key already used for another sweep")
                    return self.view(old["id"]), False
            self._check_capacity()
            sweep_id = secrets.token_hex(6)
            while (self.root / sweep_id).exists():  # pragma: no cover
                sweep_id = secrets.token_hex(6)
            sweep_dir = self.root / sweep_id
            spec = sweep.model_copy(update={"name": sweep.name or sweep_id})
            # SweepError before any file is written
            plan = service.plan_sweep(base, spec, sweep_dir)
            # Planning makes relative local paths absolute: check what the trials will run.
            self.admission.check_trials((t.name, t.config) for t in plan.trials)
            sweep_dir.mkdir(parents=True)
            request = base.model_dump(mode="json") | {"sweep": spec.model_dump(mode="json")}
            service.write_json(sweep_dir / REQUEST_FILE, request)
            service.write_json(sweep_dir / SWEEP_FILE, plan.as_dict())
            job_id = f"dmsae-sweep-{sweep_id}-1"
            record = {
                "id": sweep_id,
                "name": spec.name,
                "submitter": submitter,
                "created_at": time.time(),
                "ray_job_id": job_id,
                "job_ids": [job_id],
                "idempotency_key": key,
                "request_digest": digest,
                "stop_requested": None,
            }
            service.write_json(sweep_dir / RECORD_FILE, record)
            try:
                self._submit_job(sweep_id, job_id, submitter)
            except service.ServiceError:
                shutil.rmtree(sweep_dir, ignore_errors=True)
                raise
        return self.view(sweep_id), True

    def stop(self, sweep_id: str) -> tuple[dict[str, Any], int]:
        """(view, 202), or 200 when already stopped; 409 once finished."""
        view = self.view(sweep_id, with_summary=False)
        if view["status"] == service.STOPPED:
            return self.view(sweep_id), 200
        if view["status"] in service.TERMINAL:
            raise _conflict(409, f"sweep {sweep_id} is {view['status']}; nothing to stop")
        if not view["ray_reachable"]:
            raise service.RayUnavailable("Ray is unreachable; cannot stop the job")
        self._update(sweep_id, stop_requested=time.time())
        self.jobs.stop(view["ray_job_id"])
        return self.view(sweep_id), 202

    def resume(self, sweep_id: str) -> dict[str, Any]:
        """A new job on the same sweep directory: finished trials are not rerun."""
        with self._submit:
            view = self.view(sweep_id, with_summary=False)
            if view["status"] not in (service.STOPPED, service.FAILED):
                raise _conflict(
                    409,
                    f"sweep {sweep_id} is {view['status']}; only stopped or failed sweeps resume",
                )
            self._check_capacity()
            rec = self._record(sweep_id)
            job_id = f"dmsae-sweep-{sweep_id}-{len(rec['job_ids']) + 1}"
            self._submit_job(sweep_id, job_id, rec.get("submitter"))
            self._update(
                sweep_id, ray_job_id=job_id, job_ids=[*rec["job_ids"], job_id],
                stop_requested=None,
            )
        return self.view(sweep_id)

    def delete(self, sweep_id: str) -> None:
        """Only finished or stopped sweeps: their jobs, trials and files go."""
        view = self.view(sweep_id, with_summary=False)
        if view["status"] not in service.TERMINAL:
            raise _conflict(
                409, f"sweep {sweep_id} is {view['status']}; stop it before deleting it"
            )
        for job_id in view["job_ids"]:
            try:
                self.jobs.delete(job_id)
            except service.ServiceError:
                break  # Ray down: the jobs stay in its history, the sweep goes anyway
        shutil.rmtree(self.root / sweep_id, ignore_errors=True)


def iter_errors(err: SweepError) -> Any:
    """422 entries (as FastAPI's own) for a ``SweepError``."""
    for loc, msg in err.errors:
        yield {"type": "value_error", "loc": ["body", *loc], "msg": msg}
