"""What the dashboard shows beyond the REST API's JSON: each cycle's top-activating contexts
(what ``dmsae inspect`` computes, cached in ``cycles/NNN/inspect.json`` by a subprocess, since
this process never imports torch) and the training curves parsed from the runs' job logs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dmsae_ray import service

INSPECT_FILE = "inspect.json"
INSPECT_VERSION = 1
INSPECT_PARAMS = {"top": 10, "window": 8, "source": "heldout"}

STEP_LINE = re.compile(
    r"\[cycle (\d+)\] step (\d+)/(\d+) mse (\S+) nested (\S+) L0 (\S+) \(core (\S+)\) dead (\d+)"
)
CURVE_KEYS = ("mse", "nested_mse", "l0", "core_l0", "dead")
CURVE_POINTS = 400  # per cycle, at most



def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: JSON for a browser (JSON.parse refuses NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def artifact_json(run_dir: str, rel: str) -> Any:
    """A JSON file of a run directory, found the way the artifact endpoint finds it."""
    try:
        return _json_file(service.resolve_artifact(run_dir, rel))
    except (FileNotFoundError, service.ArtifactPathError):
        return None


# --------------------------------------------------------------------------- contexts


class Contexts:
    """The core browser's top-activating contexts: ``cycles/NNN/inspect.json`` once computed,
    else a subprocess computing it (one at a time; a failure is remembered until retried)."""

    def __init__(self, timeout_s: float = 3600) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._slot = threading.Semaphore(1)  # torch + the model: one at a time per server
        self._busy: set[tuple[str, int]] = set()
        self._errors: dict[tuple[str, int], str] = {}

    @staticmethod
    def path(run_dir: str, cycle: int) -> Path:
        return Path(run_dir) / "cycles" / f"{cycle:03d}" / INSPECT_FILE

    @staticmethod
    def valid(data: Any, cycle: int) -> bool:
        return (isinstance(data, dict) and data.get("version") == INSPECT_VERSION
                and data.get("cycle") == cycle
                and all(data.get(k) == v for k, v in INSPECT_PARAMS.items()))

    def read(self, run_dir: str, cycle: int) -> dict | None:
        data = _json_file(self.path(run_dir, cycle))
        return data if self.valid(data, cycle) else None

    def state(self, run_dir: str, cycle: int, start: bool = True) -> tuple[str, Any]:
        """("ready", data), ("computing", None) or ("failed", message); ``start``: begin
        computing when there is neither a file nor a computation nor a failure."""
        data = self.read(run_dir, cycle)
        if data is not None:
            return "ready", data
        key = (run_dir, cycle)
        with self._lock:
            if key in self._busy:
                return "computing", None
            if key in self._errors:
                return "failed", self._errors[key]
            if not start:
                return "missing", None
            self._busy.add(key)
        threading.Thread(target=self._compute, args=(key,), daemon=True,
                         name=f"inspect-{cycle}").start()
        return "computing", None

    def retry(self, run_dir: str, cycle: int) -> tuple[str, Any]:
        with self._lock:
            self._errors.pop((run_dir, cycle), None)
        return self.state(run_dir, cycle)

    def _compute(self, key: tuple[str, int]) -> None:
        run_dir, cycle = key
        error = None
        try:
            with self._slot:
                if self.read(run_dir, cycle) is None:
                    cmd = [sys.executable, "-m", "dmsae_ray.tools.inspect_latents", run_dir,
                           str(cycle), *(f"--{k}={v}" for k, v in INSPECT_PARAMS.items())]
                    out = subprocess.run(cmd, capture_output=True, text=True,
                                         timeout=self.timeout_s, stdin=subprocess.DEVNULL)
                    if out.returncode != 0:
                        tail = (out.stderr or out.stdout).strip().splitlines()[-6:]
                        error = "\n".join(tail) or f"exit status {out.returncode}"
        except subprocess.TimeoutExpired:
            error = f"gave up after {self.timeout_s:.0f} s"
        except OSError as err:
            error = str(err)
        with self._lock:
            self._busy.discard(key)
            if error is not None:
                self._errors[key] = error


# --------------------------------------------------------------------------- training curve


class Curves:
    """Per-cycle training curves parsed from the runs' Ray job logs (the API's /logs), the
    logs of ended jobs parsed once."""

    def __init__(self, jobs: service.RayJobs, keep: int = 64) -> None:
        self.jobs = jobs
        self.keep = keep
        self._done: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def parse(text: str) -> dict[tuple[int, int], dict]:
        points: dict[tuple[int, int], dict] = {}
        for line in text.splitlines():
            m = STEP_LINE.search(line)
            if not m:
                continue
            cycle, step, total = (int(m.group(i)) for i in (1, 2, 3))
            try:
                vals = [float(m.group(i)) for i in range(4, 9)]
            except ValueError:
                continue
            points[(cycle, step)] = {"total": total} | dict(zip(CURVE_KEYS, vals, strict=True))
        return points

    def _job(self, job_id: str, ended: bool) -> dict[tuple[int, int], dict]:
        with self._lock:
            if job_id in self._done:
                self._done.move_to_end(job_id)
                return self._done[job_id]
        text = self.jobs.logs(job_id)  # ServiceError: the caller says Ray is unreachable
        points = self.parse(text or "")
        if ended and text is not None:
            with self._lock:
                self._done[job_id] = points
                while len(self._done) > self.keep:
                    self._done.popitem(last=False)
        return points

    def get(self, job_ids: list[str], terminal: bool) -> dict:
        """``{"cycles": {cycle: {"step": [...], "mse": [...], ...}}}``, each cycle thinned to
        at most ``CURVE_POINTS`` points; a resumed cycle's later steps win."""
        merged: dict[tuple[int, int], dict] = {}
        for i, job_id in enumerate(job_ids):
            merged.update(self._job(job_id, ended=terminal or i < len(job_ids) - 1))
        cycles: dict[int, list[tuple[int, dict]]] = {}
        for (cycle, step), row in sorted(merged.items()):
            cycles.setdefault(cycle, []).append((step, row))
        out = {}
        for cycle, rows in cycles.items():
            stride = math.ceil(len(rows) / CURVE_POINTS)
            keep = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
            out[str(cycle)] = {"step": [s for s, _ in keep], "total": keep[-1][1]["total"]} | {
                k: [r[k] for _, r in keep] for k in CURVE_KEYS
            }
        return {"cycles": finite(out)}
