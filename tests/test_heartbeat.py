"""A run whose driver died is shown as such (issue #13, probe 8): after a kill -9 of the driver,
state.json still says "running"; the heartbeat tells ``dmsae status`` and the service otherwise."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_ports, tiny_config
from fastapi import HTTPException

from dmsae_ray import service
from dmsae_ray.run import heartbeat
from dmsae_ray.run.heartbeat import HEARTBEAT_FILE, Heartbeat, driver_liveness

RUNNING = {"status": "running"}


def _beat(run_dir: Path, host: str, pid: int, t: float) -> None:
    (run_dir / HEARTBEAT_FILE).write_text(json.dumps({"host": host, "pid": pid, "time": t}))


def test_liveness_from_the_heartbeat(tmp_path):
    now = 1_000_000.0
    assert driver_liveness(tmp_path, {"status": "completed"}, now) is None
    assert driver_liveness(tmp_path, None, now) is None
    # Another host: only the age can tell.
    _beat(tmp_path, "elsewhere", 1, now - 5)
    live = driver_liveness(tmp_path, RUNNING, now)
    assert live is not None and live.alive and live.age_s == pytest.approx(5)
    _beat(tmp_path, "elsewhere", 1, now - heartbeat.STALE_S - 1)
    live = driver_liveness(tmp_path, RUNNING, now)
    assert live is not None and not live.alive and "no heartbeat" in live.reason
    # This host: a fresh beat from a pid that is gone is dead at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _beat(tmp_path, socket.gethostname(), dead.pid, now - 1)
    live = driver_liveness(tmp_path, RUNNING, now)
    assert live is not None and not live.alive and str(dead.pid) in live.reason
    _beat(tmp_path, socket.gethostname(), os.getpid(), now - 1)
    assert driver_liveness(tmp_path, RUNNING, now).alive  # type: ignore[union-attr]
    # A run directory from before heartbeats: state.json's own time.
    (tmp_path / HEARTBEAT_FILE).unlink()
    assert driver_liveness(tmp_path, RUNNING | {"updated": now - 10}, now).alive  # type: ignore[union-attr]
    old = driver_liveness(tmp_path, RUNNING | {"updated": now - 600}, now)
    assert old is not None and not old.alive


def test_heartbeat_beats_while_the_block_runs(tmp_path):
    with Heartbeat(tmp_path, every_s=0.05):
        first = json.loads((tmp_path / HEARTBEAT_FILE).read_text())["time"]
        time.sleep(0.3)
        later = json.loads((tmp_path / HEARTBEAT_FILE).read_text())["time"]
    assert later > first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_run_status_without_ray_uses_the_heartbeat():
    gone = heartbeat.Liveness(False, "its driver (pid 7 on h) is gone", 3.0)
    alive = heartbeat.Liveness(True, "heartbeat 3 s ago", 3.0)
    status, error = service.run_status(RUNNING, None, ray_reachable=False, driver=gone)
    assert status == service.FAILED and "pid 7" in (error or "")
    assert service.run_status(RUNNING, None, ray_reachable=False, driver=alive) == (
        service.RUNNING, None
    )


def _dmsae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmsae_ray.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_a_killed_driver_is_shown_dead(tiny_dir, tmp_path):
    """`dmsae run` killed with SIGKILL mid-run: `dmsae status` and the service (Ray down, so
    only the directory can tell) say the run is dead, not running with an ETA."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_dir, run_dir, distill={"cycles": 50})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmsae_ray.cli", "run", "--config", str(tmp_path / "cfg.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / HEARTBEAT_FILE).is_file() or not (run_dir / "state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        assert json.loads(_dmsae("status", str(run_dir), "--json").stdout)["driver"]["alive"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"

    out = _dmsae("status", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "dead" in out.stdout and f"pid {proc.pid}" in out.stdout and "ETA" not in out.stdout
    raw = json.loads(_dmsae("status", str(run_dir), "--json").stdout)
    assert raw["driver"]["alive"] is False

    # The service with its Ray cluster unreachable: the run directory and heartbeat decide.
    from api.app import Runs, Settings

    runs = Runs(Settings(tmp_path / "runs", ray_address=f"http://127.0.0.1:{free_ports(1)[0]}"))
    runs.store.insert("0123456789ab", cfg, "digest", str(run_dir), "dmsae-x-1", None, None,
                      service.RUNNING)
    (view,) = runs.list(None, 10, 0)["items"]
    assert view["status"] == service.FAILED and f"pid {proc.pid}" in view["error"]
    assert not view["ray_reachable"]
    # ...but without Ray nobody can be sure the job has ended, so its directory stays.
    with pytest.raises(HTTPException) as err:
        runs.delete(runs.record("0123456789ab"))
    assert err.value.status_code == 503 and run_dir.is_dir()
