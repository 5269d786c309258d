"""api/store.py without a server: the service's SQLite record of runs. A record round-trips,
survives a new store on the same file (a restarted service), keeps every job id of its resumes,
and a status computed from a replaced job never overwrites the new job's. The service through
its REST API (a restarted server serving earlier runs, among others): test_api.py."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from api.store import RunRecord, RunStore

CONFIG = {"model": {"name": "some/model", "layer": 3}, "sae": {"k": 8}}


def insert(store: RunStore, run_id: str, key: str | None = None) -> RunRecord:
    return store.insert(run_id, CONFIG, "digest", f"/runs/{run_id}", f"dmsae-{run_id}-1",
                        "alice", key, "PENDING")


def test_a_record_round_trips_and_survives_a_restart(tmp_path):
    path = tmp_path / "db" / "runs.sqlite3"  # its directory is created
    store = RunStore(path)
    rec = insert(store, "0123456789ab", key="k-1")
    assert rec == store.get("0123456789ab") and rec.config == CONFIG
    assert rec.ray_job_id == "dmsae-0123456789ab-1" and rec.job_ids == [rec.ray_job_id]
    assert rec.status == "PENDING" and rec.status_final is False
    assert rec.error is None and rec.stop_requested is None
    assert rec.created_at == rec.updated_at and rec.submitter == "alice"
    assert store.by_idempotency_key("k-1") == rec and store.by_idempotency_key("k-2") is None
    assert store.get("ffffffffffff") is None
    assert RunStore(path).get("0123456789ab") == rec  # a new store on the same file


def test_an_idempotency_key_names_one_run(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite3")
    insert(store, "aaaaaaaaaaaa", key="same")
    with pytest.raises(sqlite3.IntegrityError):
        insert(store, "bbbbbbbbbbbb", key="same")
    insert(store, "cccccccccccc")  # no key: any number of runs
    insert(store, "dddddddddddd")
    assert {r.id for r in store.all()} == {"aaaaaaaaaaaa", "cccccccccccc", "dddddddddddd"}


def test_all_lists_the_newest_first(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite3")
    for run_id in ("bbbbbbbbbbbb", "aaaaaaaaaaaa", "cccccccccccc"):
        insert(store, run_id)
        time.sleep(0.01)
    assert [r.id for r in store.all()] == ["cccccccccccc", "aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    store.delete("aaaaaaaaaaaa")
    assert [r.id for r in store.all()] == ["cccccccccccc", "bbbbbbbbbbbb"]
    assert store.get("aaaaaaaaaaaa") is None


def test_a_status_of_a_replaced_job_does_not_overwrite_the_new_jobs(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite3")
    run_id = "0123456789ab"
    first = insert(store, run_id).ray_job_id
    store.set_status(run_id, "FAILED", True, "boom", first)
    rec = store.get(run_id)
    assert (rec.status, rec.status_final, rec.error) == ("FAILED", True, "boom")
    store.request_stop(run_id)
    assert store.get(run_id).stop_requested is not None

    # A resume: a new job, its status open again, the stop request and the error cleared.
    store.new_job(run_id, "dmsae-0123456789ab-2", "PENDING")
    rec = store.get(run_id)
    assert rec.ray_job_id == "dmsae-0123456789ab-2"
    assert rec.job_ids == [first, "dmsae-0123456789ab-2"]
    assert (rec.status, rec.status_final, rec.error, rec.stop_requested) == (
        "PENDING", False, None, None
    )
    store.set_status(run_id, "FAILED", True, "late answer about the old job", first)
    assert store.get(run_id).status == "PENDING"
    store.set_status(run_id, "RUNNING", False, None, rec.ray_job_id)
    assert store.get(run_id).status == "RUNNING"


def test_each_thread_reads_and_writes_through_its_own_connection(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite3")
    insert(store, "0123456789ab")
    seen: list[object] = []

    def worker(i: int) -> None:
        seen.append(store.get("0123456789ab").id)
        insert(store, f"{i:012d}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["0123456789ab"] * 4
    assert len(store.all()) == 5
