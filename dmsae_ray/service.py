"""What the CLI and the REST API (``api/``) share: submit a run as a Ray job, stop it, read its
job status and logs, and read the state and artefacts of its run directory.

A run is driven only through its public surface, so this module keeps working whatever the
pipeline does inside the job:

* the entrypoint command ``dmsae run --config <run_dir>/request.json`` (the validated config
  with ``run_dir`` pointing at the run directory), submitted through Ray Jobs
  (``ray.job_submission.JobSubmissionClient``); a resume is the same command in a new job;
* the run directory files: ``config.json``, ``state.json`` (atomically replaced),
  ``cycles/NNN/...`` and ``core/...``.

It is the REST service's one door into the library: ``api/`` imports this module and the
config types only. The Ray job client is ``ray_jobs.RayJobs`` (re-exported here); sweeps are
planned and summarised through ``plan_sweep`` / ``summarize_sweep``. It imports neither torch
nor the pipeline, so a service process starts in a second or two.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from dmsae_ray.config import RunConfig
from dmsae_ray.distributed.ray_jobs import STOP_ENV as STOP_ENV
from dmsae_ray.distributed.ray_jobs import JobInfo as JobInfo
from dmsae_ray.distributed.ray_jobs import RayJobs as RayJobs
from dmsae_ray.distributed.ray_jobs import RayUnavailable as RayUnavailable
from dmsae_ray.distributed.ray_jobs import ServiceError as ServiceError
from dmsae_ray.jsonio import atomic_write_json, atomic_write_text, digest, read_json_or_none
from dmsae_ray.run import sweep_plan
from dmsae_ray.run.heartbeat import Liveness
from dmsae_ray.run.heartbeat import driver_liveness as driver_liveness  # api/ reads it here
from dmsae_ray.run.runfiles import (
    COMPLETED,
    FAILED,
    REQUEST_FILE,
    RUNNING,
    STATE_FILE,
    STOPPED,
    cycle_dir,
    read_cycles,
    read_state,
)

# Statuses of a run as the service reports them (state.json combined with the Ray job).
# The run's own statuses (runfiles) plus the two only the job can tell: pending, stopping.
PENDING, STOPPING = "pending", "stopping"
TERMINAL = frozenset({COMPLETED, FAILED, STOPPED})
ACTIVE = frozenset({PENDING, RUNNING, STOPPING})
STATUSES = (PENDING, RUNNING, STOPPING, COMPLETED, FAILED, STOPPED)



# ----------------------------------------------------------------------------- run config


def prepare_run(cfg: RunConfig, run_dir: str | Path) -> tuple[RunConfig, Path]:
    """Pin ``run_dir`` (absolute: the job runs in another working directory) and write the
    config the job will run to ``<run_dir>/request.json``. Returns the config and that path."""
    root = Path(run_dir).expanduser().resolve()
    cfg = RunConfig.model_validate(cfg.model_dump(mode="json") | {"run_dir": str(root)})
    root.mkdir(parents=True, exist_ok=True)
    path = root / REQUEST_FILE
    atomic_write_text(path, json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    return cfg, path


def config_digest(cfg: RunConfig) -> str:
    """A hash of what a run computes (its run_dir left out): equal configs, equal digests.
    Values at their default are left out too, so a default written out changes nothing and a
    server upgrade that adds a config key still recognises an earlier submission's retry."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data.pop("run_dir", None)
    return digest(data)


def entrypoint(config_path: str | Path, command: str = "dmsae") -> str:
    """The job's shell command. ``command`` is resolved on the PATH of whoever started Ray."""
    return f"{command} run --config {shlex.quote(str(config_path))}"


def sweep_entrypoint(config_path: str | Path, sweep_dir: str | Path, command: str = "dmsae") -> str:
    """A sweep job's shell command: rerunning it resumes the sweep."""
    return (
        f"{command} sweep --config {shlex.quote(str(config_path))} "
        f"--sweep-dir {shlex.quote(str(sweep_dir))}"
    )


def job_resources(cfg: RunConfig) -> dict[str, Any]:
    """Resources reserved for the job's driver (the entrypoint).

    With ``ray.use_gpu`` and ``ray.num_workers == 0`` the whole run happens in the driver, so
    the driver reserves a GPU. With Ray Train workers the workers request their own GPUs; the
    driver reserving one as well would starve them on a one-GPU node.
    """
    if cfg.ray.use_gpu and cfg.ray.num_workers == 0:
        return {"entrypoint_num_gpus": 1}
    return {}


def submit_run(
    jobs: RayJobs,
    cfg: RunConfig,
    run_dir: str | Path,
    submission_id: str,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write ``request.json`` into ``run_dir`` and submit ``dmsae run`` on it as a Ray job.
    Submitting again (another ``submission_id``) on the same run_dir resumes the run."""
    cfg, path = prepare_run(cfg, run_dir)
    return jobs.submit(
        entrypoint(path, jobs.command), submission_id, metadata, job_resources(cfg)
    )


def submit_sweep(
    jobs: RayJobs,
    config_path: str | Path,
    sweep_dir: str | Path,
    submission_id: str,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit ``dmsae sweep`` on a sweep directory whose request and plan are written; the same
    call with another ``submission_id`` resumes it."""
    return jobs.submit(sweep_entrypoint(config_path, sweep_dir, jobs.command), submission_id,
                       metadata)


# ----------------------------------------------------------------------------- sweeps

# The sweep directory's files (sweep_plan.py names them; api/sweeps.py reads them through here).
SWEEP_PLAN_FILE, SWEEP_STATE_FILE = sweep_plan.SWEEP_FILE, sweep_plan.STATE_FILE
SWEEP_REQUEST_FILE, SWEEP_RECORD_FILE = sweep_plan.REQUEST_FILE, sweep_plan.RECORD_FILE
# The sweep section's type and its validation error, as api/ sees them (it imports no sweep code).
SweepSpec, SweepError = sweep_plan.SweepSpec, sweep_plan.SweepError


def plan_sweep(base: RunConfig, spec: SweepSpec, sweep_dir: Path) -> Any:
    """Every trial of a sweep, validated before anything runs (``SweepError`` names the field)."""
    return sweep_plan.plan_sweep(base, spec, sweep_dir)


def read_json(path: Path) -> Any:
    """A record, plan or state file of a sweep; None when missing or half-written."""
    return read_json_or_none(path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data)


def summarize_sweep(plan: dict[str, Any]) -> dict[str, Any]:
    """One row per trial, read back from the trials' run directories."""
    from dmsae_ray.run.sweep_summary import summarize

    return summarize(plan)


# ----------------------------------------------------------------------------- run directory


def state_mtime(run_dir: str | Path) -> float | None:
    try:
        return (Path(run_dir) / STATE_FILE).stat().st_mtime
    except FileNotFoundError:
        return None


def run_status(
    state: dict | None,
    job: JobInfo | None,
    *,
    ray_reachable: bool = True,
    stop_requested: bool = False,
    state_time: float | None = None,
    driver: Liveness | None = None,
) -> tuple[str, str | None]:
    """Combine ``state.json`` with the Ray job into (status, error).

    The run directory is the truth about completion; the Ray job is the truth about whether
    the process still runs (a killed job leaves state.json at "running"). Without Ray, the
    driver's heartbeat (``driver``, dmsae_ray/run/heartbeat.py) says whether "running" still holds.
    """
    s = (state or {}).get("status")
    s_err = (state or {}).get("error")
    if s == COMPLETED and (job is None or job.terminal):
        return COMPLETED, None
    if job is None:
        if not ray_reachable:  # best effort from the directory alone
            if s == RUNNING and driver is not None and not driver.alive:
                return FAILED, f"the driver ended without recording it ({driver.reason})"
            return {None: PENDING, "created": PENDING}.get(s, s), s_err
        if s in (FAILED, STOPPED):
            return s, s_err
        return FAILED, "the Ray job of this run is unknown to the cluster (lost or deleted)"
    if job.status == "PENDING":
        return (STOPPING if stop_requested else PENDING), None
    if job.status == "RUNNING":
        # The process still runs, whatever state.json says: a run is stopped or failed only
        # once its job has ended (so a resume never overlaps a dying job). After a resume,
        # state.json holds the previous job's final status until the new job rewrites it:
        # a "stopped" counts only if written while this job ran (e.g. `ray job stop`).
        fresh = state_time is not None and job.start_time is not None
        fresh = fresh and state_time >= job.start_time
        if stop_requested or (s == STOPPED and fresh):
            return STOPPING, None
        # A completed state.json with the job still running: the driver is releasing its
        # actors. Completed only once it has exited, so the cap never admits a run early.
        return RUNNING, None
    if s == COMPLETED:  # the job ended, however: the run directory says the work is done
        return COMPLETED, None
    if job.status == "SUCCEEDED":
        return FAILED, "the job exited without completing the run"
    if job.status == "STOPPED":
        return STOPPED, None
    # FAILED
    return FAILED, s_err or job.message or "the Ray job failed"


def read_cycle(run_dir: str | Path, cycle: int, state: dict | None = None) -> dict | None:
    """One committed cycle: its summary from state.json, core.json (selected latents, scores)
    and sae/metrics.json. None if the cycle is not committed."""
    d = cycle_dir(run_dir, cycle)
    if not d.is_dir():
        return None
    state = read_state(run_dir) if state is None else state
    summary = next((c for c in read_cycles(state) if c.cycle == cycle), None)
    out: dict[str, Any] = {
        "cycle": cycle,
        # As state.json has it: to_dict adds no key the file lacks.
        "summary": None if summary is None else summary.to_dict(),
        "core": None,
        "metrics": None,
    }
    for key, path in (("core", d / "core.json"), ("metrics", d / "sae" / "metrics.json")):
        if path.is_file():
            out[key] = json.loads(path.read_text())
    out["artifacts"] = list_artifacts(run_dir, prefix=f"cycles/{cycle:03d}")
    return out


# ----------------------------------------------------------------------------- artefacts


class ArtifactPathError(ValueError):
    """A requested artefact path that is malformed (absolute, '..', ...)."""


def _hidden(part: str) -> bool:
    # Temporary files and directories of atomic writes (".000.x1y2", ".state.json.abc").
    return part.startswith(".")


def list_artifacts(run_dir: str | Path, prefix: str = "") -> list[dict[str, Any]]:
    """Regular files of the run directory (relative POSIX paths, sizes, mtimes), temporary
    files of atomic writes left out; symlinks only when they stay inside the directory."""
    root = Path(run_dir).resolve()
    base = root / prefix if prefix else root
    if not base.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            if _hidden(name):
                continue
            path = Path(dirpath) / name
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):  # broken link; a loop (RuntimeError before 3.13)
                continue
            if not real.is_relative_to(root) or not real.is_file():
                continue
            st = real.stat()
            out.append(
                {
                    "path": path.relative_to(root).as_posix(),
                    "size": st.st_size,
                    "modified": st.st_mtime,
                }
            )
    return out


def resolve_artifact(run_dir: str | Path, rel: str) -> Path:
    """The file ``rel`` names inside ``run_dir``.

    Raises ``ArtifactPathError`` for a malformed path (empty, absolute, a '..' segment, a
    backslash or NUL) and ``FileNotFoundError`` for one that does not name a regular file
    inside the directory (missing, hidden temporary, or a symlink that leads out of it).
    """
    if not rel or "\x00" in rel or "\\" in rel:
        raise ArtifactPathError("invalid artifact path")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise ArtifactPathError("artifact paths are relative to the run directory")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ArtifactPathError("artifact paths may not contain '..'")
    if any(_hidden(p) for p in parts):
        raise FileNotFoundError(rel)
    root = Path(run_dir).resolve()
    try:
        target = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing; a symlink loop (RuntimeError before 3.13)
        raise FileNotFoundError(rel) from None
    if not target.is_relative_to(root) or not target.is_file():
        raise FileNotFoundError(rel)
    return target


# ----------------------------------------------------------------------------- helpers


def paginate(views: list[dict], status: str | None, limit: int, offset: int) -> dict[str, Any]:
    """One page of run (or sweep) views, optionally only those with ``status``."""
    if status:
        views = [v for v in views if v["status"] == status]
    nxt = offset + limit if offset + limit < len(views) else None
    return {"items": views[offset : offset + limit], "total": len(views), "limit": limit,
            "offset": offset, "next_offset": nxt}
