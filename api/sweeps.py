"""The service's sweeps, with the conventions of its distillations (``api/resource.py``): an
Idempotency-Key for retried submissions, a cap on active sweeps (429), stop, resume and delete.

Each sweep is the Ray job ``dmsae sweep --config <dir>/request.json --sweep-dir <dir>``; a
resume is the same command as a new job, which skips finished trials and resumes the others
after their last committed cycle. The record is ``record.json`` in the sweep directory, not a
database table: a restarted service lists what is on disk.
"""

from __future__ import annotations

import shutil
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from pydantic import Field

from api.policy import Admission
from api.resource import MEDIA, NotFound, Resource, new_id
from dmsae_ray import service
from dmsae_ray.config import RunConfig
from dmsae_ray.service import SweepSpec

RECORD_FILE, REQUEST_FILE = service.SWEEP_RECORD_FILE, service.SWEEP_REQUEST_FILE
STATE_FILE, SWEEP_FILE = service.SWEEP_STATE_FILE, service.SWEEP_PLAN_FILE

SWEEP_ID_CHARS = set("0123456789abcdef")

# The name api/ui.py catches for an unknown sweep.
SweepNotFound = NotFound


class SweepRequest(RunConfig):
    """``POST /v1/sweeps``: a base run config (``run_dir`` left out) plus its sweep."""

    sweep: SweepSpec = Field(description="the search space; see `dmsae sweep --help`")


def sweeps_root(runs_root: Path) -> Path:
    """Next to the runs root (``runs/api`` -> ``runs/api-sweeps``), so run ids and sweep ids
    never share a directory."""
    return runs_root.with_name(runs_root.name + "-sweeps")


def request_digest(request: dict[str, Any]) -> str:
    return service.digest(request)


class Sweeps(Resource[str]):
    """The sweeps, one directory each under ``root``; an item is a sweep's id."""

    noun, plural, missing = "sweep", "sweeps", "sweep"
    retry_after = "60"
    key_reused = "Idempotency-Key already used for another sweep"
    update_event = "trial"
    media = MEDIA | {".csv": "text/csv"}

    def __init__(
        self, root: str | Path, jobs: service.RayJobs, max_active: int = 2, *,
        admission: Admission | None = None, lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        """``admission``: the rules every request passes (api/policy.py, shared with
        distillations); ``lock``: held while a sweep is admitted and submitted (the runs'
        lock, so that a run's core is not deleted meanwhile)."""
        super().__init__(jobs, max_active, lock)
        self.root = Path(root).expanduser().resolve()
        self.admission = admission or Admission()

    # ------------------------------------------------------------------ records
    def find(self, ident: str) -> str | None:
        valid = len(ident) == 12 and set(ident) <= SWEEP_ID_CHARS
        return ident if valid and (self.root / ident / RECORD_FILE).is_file() else None

    def ident_of(self, item: str) -> str:
        return item

    def directory(self, item: str) -> Path:
        return self.root / item

    def _dir(self, sweep_id: str) -> Path:
        return self.directory(self.get(sweep_id))

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

    def items(self) -> list[str]:
        return self.ids()

    def job_ids(self, item: str) -> list[str]:
        return self._record(item).get("job_ids", [])

    # ------------------------------------------------------------------ reading
    def view(
        self, item: str, jobs: dict[str, service.JobInfo] | None = None,
        ray_down: bool = False, detail: bool = True,
    ) -> dict[str, Any]:
        """``detail``: with the spec and the live summary."""
        sweep_id = item
        d = self._dir(sweep_id)
        rec = service.read_json(d / RECORD_FILE) or {}
        state = service.read_json(d / STATE_FILE)
        job, reachable = self._job(rec.get("ray_job_id"), jobs, ray_down)
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
        if detail:
            out["spec"] = plan.get("spec")
            out["summary"] = self.summary(sweep_id) if plan else None
        return out

    def progress(self, view: dict[str, Any]) -> dict[str, Any]:
        counts = (view.get("summary") or {}).get("counts", {})
        return {k: view[k] for k in ("status", "error", "ray_job_id", "trials")} | {
            "counts": counts
        }

    def updates(self, view: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        return [(r["trial"], r) for r in (view.get("summary") or {}).get("rows", [])]

    def summary(self, sweep_id: str) -> dict[str, Any]:
        """Live: read from the trials' run directories now, not from the last written file."""
        plan = service.read_json(self._dir(sweep_id) / SWEEP_FILE)
        if not plan:
            raise SweepNotFound(f"sweep {sweep_id} has no plan yet")
        return service.summarize_sweep(plan)

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
    def _admit(self, body: SweepRequest) -> tuple[Any, str]:
        base, sweep = self.admission.check(body, body.sweep)
        assert sweep is not None
        return (base, sweep), request_digest(body.model_dump(mode="json", exclude_defaults=True))

    def _replay(self, key: str) -> tuple[str, str | None] | None:
        for sweep_id in self.ids():
            rec = service.read_json(self.root / sweep_id / RECORD_FILE) or {}
            if rec.get("idempotency_key") == key:
                return rec["id"], rec.get("request_digest")
        return None

    def _submit_job(self, sweep_id: str, job_id: str, submitter: str | None) -> None:
        d = self.root / sweep_id
        service.submit_sweep(
            self.jobs, d / REQUEST_FILE, d, job_id,
            {"dmsae_sweep_id": sweep_id, "submitter": submitter or ""},
        )

    def _start(
        self, admitted: tuple[RunConfig, SweepSpec], digest: str, key: str | None,
        submitter: str | None,
    ) -> str:
        """Plans the sweep first: a ``SweepError`` (or a trial ``policy.Rejected``) leaves no
        file behind."""
        base, sweep = admitted
        sweep_id = new_id(lambda i: (self.root / i).exists())
        sweep_dir = self.root / sweep_id
        spec = sweep.model_copy(update={"name": sweep.name or sweep_id})
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
        return sweep_id

    def _request_stop(self, item: str) -> None:
        self._update(item, stop_requested=time.time())

    def _resubmit(self, item: str) -> None:
        """The same command as a new job: finished trials are not rerun."""
        rec = self._record(item)
        job_id = f"dmsae-sweep-{item}-{len(rec['job_ids']) + 1}"
        self._submit_job(item, job_id, rec.get("submitter"))
        self._update(
            item, ray_job_id=job_id, job_ids=[*rec["job_ids"], job_id], stop_requested=None,
        )

    def _remove(self, item: str) -> None:
        """Trials and all."""
        shutil.rmtree(self.root / item, ignore_errors=True)
