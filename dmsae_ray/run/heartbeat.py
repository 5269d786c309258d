"""Is the driver of a run still alive? A heartbeat file beside ``state.json``.

A driver killed with SIGKILL (or a lost node) cannot write its end into ``state.json``, which
then says "running" for ever. So while it works, the driver rewrites ``heartbeat.json`` every
``EVERY_S`` seconds: its host, pid and the time. A reader that finds the same host and a dead
pid knows at once; anyone else knows once the heartbeat is older than ``STALE_S``.

Torch-free and Ray-free: ``dmsae status`` and the REST service read it without loading either.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from dmsae_ray.jsonio import atomic_write_json
from dmsae_ray.run.runfiles import HEARTBEAT_FILE, RUNNING

EVERY_S = 10.0
# Six missed beats: a driver busy in a long torch call still beats (the thread needs the GIL
# only briefly, and torch releases it), so staleness means the process is gone or frozen.
STALE_S = 60.0


def beat(run_dir: str | Path) -> None:
    atomic_write_json(
        Path(run_dir) / HEARTBEAT_FILE,
        {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()},
        indent=None,
    )


class Heartbeat:
    """``with Heartbeat(run_dir): ...`` beats from a daemon thread while the block runs."""

    def __init__(self, run_dir: str | Path, every_s: float = EVERY_S) -> None:
        self.run_dir, self.every_s = Path(run_dir), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dmsae-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                beat(self.run_dir)
            except OSError:
                pass  # a full or flaky disk must not kill the run; staleness will show it

    def __enter__(self) -> Heartbeat:
        beat(self.run_dir)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class Liveness:
    alive: bool
    reason: str  # why we think so, for people
    age_s: float | None  # seconds since the last beat (None: no heartbeat file)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def driver_liveness(
    run_dir: str | Path, state: dict | None, now: float | None = None, stale_s: float = STALE_S
) -> Liveness | None:
    """Whether the driver of a run whose ``state.json`` says "running" is alive; None for runs
    that do not claim to run (nothing to check)."""
    if (state or {}).get("status") != RUNNING:
        return None
    now = time.time() if now is None else now
    try:
        hb = json.loads((Path(run_dir) / HEARTBEAT_FILE).read_text())
        host, pid, last = str(hb["host"]), int(hb["pid"]), float(hb["time"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        # A run directory written before heartbeats: the state file's own time is all we have.
        last = (state or {}).get("updated")
        if last is None:
            return Liveness(True, "no heartbeat recorded", None)
        age = now - float(last)
        if age > stale_s:
            return Liveness(False, f"state.json unchanged for {age:.0f} s, no heartbeat", age)
        return Liveness(True, "state.json recently updated", age)
    age = max(now - last, 0.0)
    if host == socket.gethostname() and not _pid_alive(pid):
        return Liveness(False, f"its driver (pid {pid} on {host}) is gone", age)
    if age > stale_s:
        return Liveness(False, f"no heartbeat from its driver for {age:.0f} s", age)
    return Liveness(True, f"heartbeat {age:.0f} s ago", age)
