"""The run directory's names and the values in its ``state.json``: what every reader and writer
of a run directory shares. Torch- and Ray-free, so ``dmsae status`` and the REST service read
run directories without loading either (``rundir.py`` writes them; docs/run-directory.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

CONFIG_FILE = "config.json"  # written by the pipeline when the run directory comes into being
STATE_FILE = "state.json"
REQUEST_FILE = "request.json"  # the config a service-submitted job runs
HEARTBEAT_FILE = "heartbeat.json"  # the driver's beat (heartbeat.py)
CYCLES_DIR, CORE_DIR = "cycles", "core"

# What the run writes to state.json's "status" (the service adds pending and stopping).
CREATED, RUNNING = "created", "running"
COMPLETED, FAILED, STOPPED = "completed", "failed", "stopped"


def new_state() -> dict:
    """The state of a run before its first write (never on disk with status ``created``)."""
    return {
        "status": CREATED,
        "cycle": 0,  # the cycle being worked on (== number of committed cycles)
        "stage": None,
        "progress": {},
        "norm_factor": None,
        "d_in": None,
        "cycles": [],  # one summary per committed cycle
        "error": None,
    }


def cycle_dir(run_dir: str | Path, cycle: int) -> Path:
    return Path(run_dir) / CYCLES_DIR / f"{cycle:03d}"


def read_state(run_dir: str | Path) -> dict | None:
    """``state.json``, or None before the run wrote one. It is replaced atomically, so a read
    never sees half a file; a transient read error is retried once."""
    path = Path(run_dir) / STATE_FILE
    for attempt in range(2):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            if attempt:
                raise
            time.sleep(0.05)
    return None
