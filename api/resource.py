"""Distillations (``api/runs.py``) and sweeps (``api/sweeps.py``) as one REST resource.

Both are items that run as Ray jobs on a directory of their own, and a request treats them
alike: an Idempotency-Key for retried submissions, a cap on active items (429), stop, resume
and delete allowed by the same statuses (409 otherwise), logs by attempt, files confined to the
directory. ``Resource`` holds those rules once; a subclass says how its items are stored,
admitted and submitted. ``api/routes.py`` puts the routes over any ``Resource``.
"""

from __future__ import annotations

import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from api.policy import Rejected
from dmsae_ray import service
from dmsae_ray.service import SweepError

Item = TypeVar("Item")  # how a collection hands one item around: a run's record, a sweep's id

MEDIA = {".json": "application/json", ".md": "text/markdown", ".png": "image/png"}


def http_error(code: int, detail: Any, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(code, detail, headers=headers)


class NotFound(HTTPException):
    """404: an unknown id, an uncommitted cycle, a missing artifact or log. An HTTPException so
    that the API and the web UI's pages answer it alike; ``str()`` is the detail alone, for a
    page that quotes it."""

    def __init__(self, detail: str) -> None:
        super().__init__(404, detail)

    def __str__(self) -> str:
        return str(self.detail)


def invalid(errors: Iterable[tuple[Sequence[Any], str]]) -> RequestValidationError:
    """A 422 in FastAPI's own shape: one entry per refused field of the body."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ["body", *loc], "msg": msg} for loc, msg in errors]
    )


@contextmanager
def as_http() -> Iterator[None]:
    """What the layers below raise for a request, as the API answers it: a body the policy
    refuses or an invalid sweep is 422, Ray unreachable or refusing a job 503."""
    try:
        yield
    except (Rejected, SweepError) as err:
        raise invalid(err.errors) from None
    except service.ServiceError as err:
        raise http_error(503, str(err)) from None


# A run directory's tokenised corpus (the Ray backend's tokens/, and its temporary
# tokens.tmp/): served only with `dmsae serve --serve-tokens`.
TOKEN_DIRS = ("tokens", "tokens.tmp")


def corpus_tokens(parts: tuple[str, ...] | list[str]) -> bool:
    """``parts`` (relative to a run or sweep directory) lie in a run's tokens directory."""
    parts = tuple(parts)
    if parts[:1] and parts[0] in TOKEN_DIRS:
        return True
    return len(parts) > 2 and parts[0] == "trials" and parts[2] in TOKEN_DIRS


def refuse_tokens(serve_tokens: bool, rel: str, target: Path, root: str | Path) -> None:
    """403 for a file of a run's tokens/ (as requested, or where a symlink leads) unless the
    operator serves them."""
    if serve_tokens:
        return
    requested = tuple(p for p in rel.split("/") if p not in ("", "."))
    if corpus_tokens(requested) or corpus_tokens(target.relative_to(Path(root).resolve()).parts):
        raise http_error(403, "the corpus tokens (tokens/) are not served; the operator can allow "
                         "it with dmsae serve --serve-tokens")


def new_id(taken: Callable[[str], bool]) -> str:
    """A fresh id of 12 hex digits, the only form a collection's ``find`` accepts."""
    ident = secrets.token_hex(6)
    while taken(ident):  # pragma: no cover
        ident = secrets.token_hex(6)
    return ident


class Resource(ABC, Generic[Item]):
    """A collection of items, each a directory run by one Ray job per attempt, with the rules
    every request follows. Subclasses name their items in messages and provide the storage,
    admission and submission; methods raise HTTP errors (``HTTPException``,
    ``RequestValidationError``), so that every caller, not only the routes of
    ``api/routes.py``, gets the API's answers."""

    noun: str  # in messages: "run 3f9a1c2b7d4e is running"
    plural: str  # "4 runs are already active"
    missing: str  # the 404 of an unknown id: "no distillation '...'"
    retry_after: str  # seconds a client waits after the cap's 429
    key_reused: str  # the 422 of an Idempotency-Key sent again with another body
    update_event: str  # the event stream's event for one part of the view (a cycle, a trial)
    media: Mapping[str, str] = MEDIA  # artifacts' content types by suffix

    def __init__(
        self, jobs: service.RayJobs, max_active: int,
        cores: AbstractContextManager[Any] | None = None,
    ) -> None:
        """``cores``: held while a request is admitted and submitted. Distillations and sweeps
        share one, which a run's delete holds too: a run's distilled core cannot go while a
        request naming it as distill.init_core is admitted."""
        self.jobs = jobs
        self.max_active = max_active
        self.cores: AbstractContextManager[Any] = (
            threading.RLock() if cores is None else cores
        )
        self._submit = threading.Lock()  # the cap check, idempotency and submission as one step

    # ------------------------------------------------------- what a collection provides
    @abstractmethod
    def find(self, ident: str) -> Item | None:
        """The item, None for an id this collection does not hold."""

    @abstractmethod
    def ident_of(self, item: Item) -> str: ...

    @abstractmethod
    def items(self) -> list[Item]:
        """Every item, newest first."""

    @abstractmethod
    def view(
        self, item: Item, jobs: dict[str, service.JobInfo] | None = None,
        ray_down: bool = False, detail: bool = True,
    ) -> dict[str, Any]:
        """The item as the API shows it. ``jobs``: every job of the cluster, fetched in one
        call for a list; ``ray_down``: that call failed; ``detail=False``: what a list or a
        status check needs, not the whole view."""

    @abstractmethod
    def directory(self, item: Item) -> Path: ...

    @abstractmethod
    def job_ids(self, item: Item) -> list[str]:
        """The item's Ray jobs, first submission first."""

    @abstractmethod
    def progress(self, view: dict[str, Any]) -> dict[str, Any]:
        """What the event stream's ``progress`` event carries besides the id."""

    @abstractmethod
    def updates(self, view: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        """The keyed parts of a view the event stream sends as ``update_event`` when new or
        changed."""

    @abstractmethod
    def core_users(self, run_dir: str) -> list[str]:
        """Items whose config names ``run_dir``'s distilled core as distill.init_core."""

    @abstractmethod
    def _admit(self, body: Any) -> tuple[Any, str]:
        """(what to start, digest of the body), or ``Rejected`` / ``SweepError``."""

    @abstractmethod
    def _replay(self, key: str) -> tuple[str, str | None] | None:
        """(id, body digest) of the item created with this Idempotency-Key, if any."""

    @abstractmethod
    def _start(self, admitted: Any, digest: str, key: str | None, submitter: str | None) -> str:
        """Record a new item and submit its first job; its id. Leaves nothing behind when
        the submission fails."""

    @abstractmethod
    def _request_stop(self, item: Item) -> None: ...

    @abstractmethod
    def _resubmit(self, item: Item) -> None:
        """Submit the item's next job and record it."""

    @abstractmethod
    def _remove(self, item: Item) -> None:
        """The item's directory and record (its jobs are gone already)."""

    def is_final(self, item: Item) -> bool:
        """Whether the item's status is stored as final: Ray is not asked for it again."""
        return False

    def _check_delete(self, item: Item, view: dict[str, Any]) -> None:
        """Raises when a terminal item must stay nonetheless."""

    # ------------------------------------------------------------------ reading
    def get(self, ident: str) -> Item:
        item = self.find(ident)
        if item is None:
            raise NotFound(f"no {self.missing} {ident!r}")
        return item

    def snapshot(self, ident: str) -> dict[str, Any] | None:
        """The item's view; None once it is gone (an event stream then ends)."""
        try:
            return self.view(self.get(ident))
        except NotFound:
            return None

    def _job(
        self, job_id: str | None, jobs: dict[str, service.JobInfo] | None, ray_down: bool
    ) -> tuple[service.JobInfo | None, bool]:
        """(the job, whether Ray answered), from ``jobs`` when the caller has them."""
        if ray_down:
            return None, False
        if not job_id:
            return None, True
        try:
            job = jobs.get(job_id) if jobs is not None else None
            return (job if job is not None else self.jobs.info(job_id)), True
        except service.ServiceError:
            return None, False

    def _views(self, items: list[Item]) -> list[dict[str, Any]]:
        jobs, down = None, False
        if any(not self.is_final(i) for i in items):
            try:
                jobs = self.jobs.all()  # one call for all of them, not one per item
            except service.ServiceError:
                down = True
        return [self.view(i, jobs, ray_down=down, detail=False) for i in items]

    def list(self, status: str | None, limit: int, offset: int) -> dict[str, Any]:
        return service.paginate(self._views(self.items()), status, limit, offset)

    def active_count(self) -> int:
        views = self._views([i for i in self.items() if not self.is_final(i)])
        return sum(v["status"] in service.ACTIVE for v in views)

    def check_capacity(self) -> None:
        if self.active_count() >= self.max_active:
            raise http_error(
                429, f"{self.max_active} {self.plural} are already active; retry when one "
                "finishes", {"Retry-After": self.retry_after},
            )

    def logs(self, item: Item, attempt: int | None, tail: int | None) -> str:
        """The driver log of the item's job ``attempt`` (1 = first; default the latest)."""
        job_ids = self.job_ids(item)
        if attempt is not None and attempt > len(job_ids):
            raise NotFound(f"{self.noun} {self.ident_of(item)} has {len(job_ids)} job(s)")
        job_id = job_ids[(attempt or len(job_ids)) - 1]
        with as_http():
            text = self.jobs.logs(job_id)
        if text is None:
            raise NotFound(f"Ray has no logs for job {job_id}")
        if tail is not None:
            text = "\n".join(text.splitlines()[-tail:]) + "\n"
        return text

    def artifact(self, item: Item, rel: str) -> Path:
        """A regular file inside the item's directory: 400 for a malformed path, 404 for
        anything else that is not one."""
        try:
            return service.resolve_artifact(self.directory(item), rel)
        except service.ArtifactPathError as err:
            raise http_error(400, str(err)) from None
        except FileNotFoundError:
            raise NotFound(f"no artifact {rel!r}") from None

    # ------------------------------------------------------------------ writing
    def create(
        self, body: Any, key: str | None, submitter: str | None
    ) -> tuple[dict[str, Any], bool]:
        """(view, created). A retry with the same Idempotency-Key and body gets the first item
        (created False) before the cap is checked; with another body, 422."""
        with self.cores, as_http():
            admitted, digest = self._admit(body)
            with self._submit:
                old = self._replay(key) if key is not None else None
                if old is not None:
                    ident, first = old
                    if first != digest:
                        raise http_error(422, self.key_reused)
                    created = False
                else:
                    self.check_capacity()
                    ident, created = self._start(admitted, digest, key, submitter), True
        return self.view(self.get(ident)), created

    def stop(self, item: Item) -> tuple[dict[str, Any], int]:
        """(view, 202); (view, 200) when already stopped; 409 once finished otherwise."""
        ident = self.ident_of(item)
        view = self.view(item, detail=False)
        if view["status"] == service.STOPPED:
            return self.view(item), 200
        if view["status"] in service.TERMINAL:
            raise http_error(409, f"{self.noun} {ident} is {view['status']}; nothing to stop")
        if not view["ray_reachable"]:
            raise http_error(503, "Ray is unreachable; cannot stop the job")
        self._request_stop(item)
        with as_http():
            self.jobs.stop(view["ray_job_id"] or "")
        return self.view(self.get(ident)), 202

    def resume(self, item: Item) -> dict[str, Any]:
        """A new job on the same directory, for a stopped or failed item only."""
        ident = self.ident_of(item)
        with self._submit:
            item = self.get(ident)  # as it is now, not as the caller read it
            view = self.view(item, detail=False)
            if view["status"] not in (service.STOPPED, service.FAILED):
                raise http_error(
                    409, f"{self.noun} {ident} is {view['status']}; only stopped or failed "
                    f"{self.plural} resume",
                )
            self.check_capacity()
            with as_http():
                self._resubmit(item)
        return self.view(self.get(ident))

    def delete(self, item: Item) -> None:
        """A terminal item's Ray jobs, directory and record; 409 while it is active."""
        view = self.view(item, detail=False)
        if view["status"] not in service.TERMINAL:
            raise http_error(
                409, f"{self.noun} {self.ident_of(item)} is {view['status']}; stop it before "
                "deleting it",
            )
        self._check_delete(item, view)
        for job_id in view["job_ids"]:
            try:
                self.jobs.delete(job_id)
            except service.ServiceError:
                break  # Ray down: the jobs stay in its history, the item goes anyway
        self._remove(item)
