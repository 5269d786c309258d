"""The run directory's names and the values in its ``state.json``: what every reader and writer
of a run directory shares. Torch- and Ray-free, so ``dmsae status`` and the REST service read
run directories without loading either (``rundir.py`` writes them; docs/run-directory.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class CycleSummary:
    """One committed cycle as ``state.json``'s ``cycles`` list records it (and, less its
    ``seconds``, ``cycles/NNN/sae/metrics.json``). ``train`` and ``eval`` stay dicts: their keys
    grow with the metric set (``fve``, ``nested_fve``, ``l0_overflow`` came later; Ray adds
    ``resumed_from``), so a reader asks them with ``.get``. Treat them as read-only."""

    cycle: int
    core_in: int | None = None  # core size carried into the cycle
    core_size: int | None = None  # latents selected
    jaccard: float | None = None  # to the previous cycle's selection; None in cycle 0
    fraction: float | None = None  # attribution reached; None when nothing was selected
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    # None until the commit: metrics.json is written before the cycle's time is known.
    seconds: float | None = None
    # Keys this version does not know (a newer writer's), kept so a read-and-write-back
    # loses nothing.
    extra: dict[str, Any] = field(default_factory=dict)
    # Keys the source dict lacked: to_dict leaves them out again while they hold their default
    # (a replace() sets them), so the JSON a reader passes on (the API's cycle detail) is the
    # file's, not one with defaults filled in.
    missing: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CycleSummary:
        """A summary as any version wrote it. An absent key reads as what the readers' ``.get``
        made of it (None; ``{}`` for ``train`` and ``eval``); only ``cycle`` is required."""
        if "cycle" not in d:
            raise ValueError(f"a cycle summary without 'cycle': {sorted(d)}")
        known = _SUMMARY_KEYS
        return cls(
            **{k: d[k] for k in known if k in d},
            extra={k: v for k, v in d.items() if k not in known},
            missing=frozenset(k for k in known if k not in d),
        )

    def to_dict(self) -> dict[str, Any]:
        """The dict the pipeline writes: its keys in its order, then any unknown ones."""
        out: dict[str, Any] = {}
        for k in _SUMMARY_KEYS:
            v = getattr(self, k)
            if (k in self.missing and v == _DEFAULTS[k]) or (k == "seconds" and v is None):
                continue
            # A copy: the caller may extend the dict it gets, the summary stays as it was.
            out[k] = dict(v) if isinstance(v, dict) else v
        return out | self.extra


# The keys of a summary, in the order the pipeline writes them, and what an absent one reads as.
_SUMMARY_KEYS = tuple(f.name for f in fields(CycleSummary) if f.name not in ("extra", "missing"))
_DEFAULTS: dict[str, Any] = {
    f.name: f.default_factory() if f.default_factory is not MISSING else f.default
    for f in fields(CycleSummary)
    if f.name in _SUMMARY_KEYS and f.name != "cycle"
}


def read_cycles(state: Mapping[str, Any] | None) -> list[CycleSummary]:
    """The committed cycles of a ``state.json`` (as ``read_state`` returns it), oldest first."""
    return [CycleSummary.from_dict(c) for c in (state or {}).get("cycles") or []]
