"""The service's own record of runs, in SQLite next to the runs root, so that a restarted
service lists and serves every earlier run.

One row per run: id, the submitted config, the current Ray job id and every earlier one,
submitter, timestamps, idempotency key, and the last status the service computed (used to
skip Ray for runs that are known to be finished).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id              TEXT PRIMARY KEY,
    config          TEXT NOT NULL,
    config_digest   TEXT NOT NULL,
    run_dir         TEXT NOT NULL,
    ray_job_id      TEXT,
    job_ids         TEXT NOT NULL DEFAULT '[]',
    submitter       TEXT,
    idempotency_key TEXT UNIQUE,
    status          TEXT NOT NULL,
    status_final    INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    stop_requested  REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
"""


@dataclass
class RunRecord:
    id: str
    config: dict[str, Any]
    config_digest: str
    run_dir: str
    ray_job_id: str | None
    job_ids: list[str]
    submitter: str | None
    idempotency_key: str | None
    status: str
    status_final: bool
    error: str | None
    stop_requested: float | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        d = dict(row)
        d["config"] = json.loads(d["config"])
        d["job_ids"] = json.loads(d["job_ids"])
        d["status_final"] = bool(d["status_final"])
        return cls(**d)


class RunStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        # One connection per thread (sqlite3 connections are not shared across threads).
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        yield db

    def insert(
        self,
        run_id: str,
        config: dict[str, Any],
        config_digest: str,
        run_dir: str,
        ray_job_id: str,
        submitter: str | None,
        idempotency_key: str | None,
        status: str,
    ) -> RunRecord:
        now = time.time()
        with self._conn() as db:
            db.execute(
                "INSERT INTO runs (id, config, config_digest, run_dir, ray_job_id, job_ids,"
                " submitter, idempotency_key, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    json.dumps(config),
                    config_digest,
                    run_dir,
                    ray_job_id,
                    json.dumps([ray_job_id]),
                    submitter,
                    idempotency_key,
                    status,
                    now,
                    now,
                ),
            )
        rec = self.get(run_id)
        assert rec is not None
        return rec

    def get(self, run_id: str) -> RunRecord | None:
        with self._conn() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return RunRecord.from_row(row) if row else None

    def by_idempotency_key(self, key: str) -> RunRecord | None:
        with self._conn() as db:
            row = db.execute("SELECT * FROM runs WHERE idempotency_key = ?", (key,)).fetchone()
        return RunRecord.from_row(row) if row else None

    def all(self) -> list[RunRecord]:
        """Newest first."""
        with self._conn() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created_at DESC, id").fetchall()
        return [RunRecord.from_row(r) for r in rows]

    def set_status(
        self, run_id: str, status: str, final: bool, error: str | None, job_id: str | None
    ) -> None:
        """Record the last computed status (``final``: it cannot change without a resume), if
        the run's job is still ``job_id``: a status computed from a job that a resume has
        since replaced must not overwrite the new job's."""
        with self._conn() as db:
            db.execute(
                "UPDATE runs SET status = ?, status_final = ?, error = ?, updated_at = ?"
                " WHERE id = ? AND ray_job_id IS ?"
                " AND (status != ? OR status_final != ? OR error IS NOT ?)",
                (status, int(final), error, time.time(), run_id, job_id, status, int(final),
                 error),
            )

    def request_stop(self, run_id: str) -> None:
        with self._conn() as db:
            db.execute(
                "UPDATE runs SET stop_requested = ?, updated_at = ? WHERE id = ?",
                (time.time(), time.time(), run_id),
            )

    def new_job(self, run_id: str, ray_job_id: str, status: str) -> None:
        rec = self.get(run_id)
        assert rec is not None
        with self._conn() as db:
            db.execute(
                "UPDATE runs SET ray_job_id = ?, job_ids = ?, status = ?, status_final = 0,"
                " error = NULL, stop_requested = NULL, updated_at = ? WHERE id = ?",
                (ray_job_id, json.dumps([*rec.job_ids, ray_job_id]), status, time.time(), run_id),
            )

    def delete(self, run_id: str) -> None:
        with self._conn() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
