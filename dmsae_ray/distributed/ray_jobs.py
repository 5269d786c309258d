"""Ray jobs as the service uses them: ``RayJobs``, a thread-safe, caching wrapper of Ray's
``JobSubmissionClient`` (imported lazily, so the service starts without Ray), and ``JobInfo``,
what the service needs of a job. ``service.py`` submits runs and sweeps through it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

# Ray Jobs stops a job with SIGTERM (`dmsae run` turns it into a KeyboardInterrupt, so the run
# records status "stopped") and SIGKILLs it 3 s later unless told otherwise: the job's
# runtime_env reaches the job supervisor's environment, so this gives the driver 20 s to wind
# down. (Not SIGINT via RAY_JOB_STOP_SIGNAL: Ray Train's fit() replaces the SIGINT handler for
# good, so a driver that trained once would only abort its current fit.) Whatever happens,
# every file of the run directory is written atomically, so a killed job resumes after its
# last committed cycle.
STOP_ENV = {"RAY_JOB_STOP_WAIT_TIME_S": "20"}

class ServiceError(RuntimeError):
    """The cluster could not do what was asked (unreachable, refused the job, ...)."""


class RayUnavailable(ServiceError):
    """The Ray job server does not answer."""


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: str  # PENDING RUNNING STOPPED SUCCEEDED FAILED
    message: str | None = None
    start_time: float | None = None  # seconds since the epoch
    end_time: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "message": self.message,
            "start_time": self.start_time,
            "end_time": self.end_time,
        }


def _job_info(details: Any) -> JobInfo:
    def seconds(ms: Any) -> float | None:
        return ms / 1000.0 if ms else None

    status = details.status
    return JobInfo(
        job_id=details.submission_id or details.job_id,
        status=getattr(status, "value", str(status)),
        message=details.message,
        start_time=seconds(details.start_time),
        end_time=seconds(details.end_time),
        metadata=dict(details.metadata or {}),
    )


class RayJobs:
    """A thread-safe wrapper of ``JobSubmissionClient`` for dmsae runs.

    The client is created lazily (its constructor needs the cluster up) and recreated after a
    connection error. Job statuses are cached for ``cache_ttl`` seconds so that many status
    requests at once cost the Ray job server one call.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        command: str = "dmsae",
        env_vars: dict[str, str] | None = None,
        cache_ttl: float = 1.0,
    ) -> None:
        self.address = address
        self.command = command
        self.env_vars = dict(STOP_ENV if env_vars is None else env_vars)
        self.cache_ttl = cache_ttl
        self._client: Any = None
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, JobInfo | None]] = {}
        self._all: tuple[float, dict[str, JobInfo]] | None = None
        self._fetching: dict[str, threading.Lock] = {}

    # connection
    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address)
                except (ConnectionError, OSError) as err:
                    raise RayUnavailable(f"Ray job server unreachable: {err}") from None
                except Exception as err:  # version check failures, bad addresses
                    raise RayUnavailable(f"Ray job server unusable: {err}") from None
            return self._client

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        import requests

        client = self.client
        try:
            return getattr(client, name)(*args, **kwargs)
        except (ConnectionError, requests.exceptions.RequestException) as err:
            with self._lock:
                self._client = None
            raise RayUnavailable(f"Ray job server unreachable: {err}") from None

    def ping(self) -> str:
        """The cluster's Ray version (its ``ray.__version__``, e.g. ``2.60.0``, from the job
        server's /api/version; not the job API's version); raises ``RayUnavailable``."""
        r = self._call("_do_request", "GET", "/api/version")
        if r.status_code != 200:
            raise RayUnavailable(f"Ray job server answered /api/version with {r.status_code}")
        try:
            return str(r.json()["ray_version"])
        except (ValueError, KeyError, TypeError):
            raise RayUnavailable("Ray job server sent no ray_version") from None

    def invalidate(self, job_id: str | None = None) -> None:
        with self._lock:
            if job_id is None:
                self._cache.clear()
            else:
                self._cache.pop(job_id, None)
            self._all = None

    # jobs
    def submit(
        self,
        command: str,
        submission_id: str,
        metadata: dict[str, str] | None = None,
        resources: dict[str, Any] | None = None,
    ) -> str:
        """Submit the shell command ``command`` (see ``entrypoint``, ``sweep_entrypoint``)."""
        try:
            job_id = self._call(
                "submit_job",
                entrypoint=command,
                submission_id=submission_id,
                metadata={k: str(v) for k, v in (metadata or {}).items()},
                runtime_env={"env_vars": dict(self.env_vars)} if self.env_vars else None,
                **(resources or {}),
            )
        except RayUnavailable:
            raise
        except RuntimeError as err:
            raise ServiceError(f"Ray refused the job: {err}") from None
        self.invalidate(job_id)
        return job_id

    def stop(self, job_id: str) -> bool:
        try:
            return bool(self._call("stop_job", job_id))
        except RayUnavailable:
            raise
        except RuntimeError:
            return False  # unknown job
        finally:
            self.invalidate(job_id)

    def delete(self, job_id: str) -> bool:
        try:
            return bool(self._call("delete_job", job_id))
        except RayUnavailable:
            raise
        except RuntimeError:
            return False
        finally:
            self.invalidate(job_id)

    def _cached(self, job_id: str) -> tuple[bool, JobInfo | None]:
        with self._lock:
            hit = self._cache.get(job_id)
            if hit and time.monotonic() - hit[0] < self.cache_ttl:
                return True, hit[1]
        return False, None

    def info(self, job_id: str) -> JobInfo | None:
        """The job, or None when the cluster does not know it (deleted, cluster restarted)."""
        found, info = self._cached(job_id)
        if found:
            return info
        # One request per job at a time: fifty status calls arriving together wait for the
        # first one's answer instead of sending fifty requests to a busy dashboard.
        with self._lock:
            fetching = self._fetching.setdefault(job_id, threading.Lock())
        with fetching:
            found, info = self._cached(job_id)
            if found:
                return info
            return self._fetch(job_id)

    def _fetch(self, job_id: str) -> JobInfo | None:
        try:
            info: JobInfo | None = _job_info(self._call("get_job_info", job_id))
        except RayUnavailable:
            raise
        except RuntimeError as err:
            if "404" not in str(err) and "does not exist" not in str(err):
                raise ServiceError(str(err)) from None
            info = None
        # Stamped when the answer came: callers queued behind a slow fetch reuse it.
        with self._lock:
            self._cache[job_id] = (time.monotonic(), info)
        return info

    def all(self) -> dict[str, JobInfo]:
        """Every job the cluster knows, by submission id (one call, cached)."""
        now = time.monotonic()
        with self._lock:
            if self._all and now - self._all[0] < self.cache_ttl:
                return self._all[1]
        jobs = {}
        for details in self._call("list_jobs"):
            if details.submission_id:
                info = _job_info(details)
                jobs[info.job_id] = info
        with self._lock:
            self._all = (now, jobs)
        return jobs

    def logs(self, job_id: str) -> str | None:
        try:
            return str(self._call("get_job_logs", job_id))
        except RayUnavailable:
            raise
        except RuntimeError:
            return None
