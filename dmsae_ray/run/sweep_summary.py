"""Sweeps, the results: read each trial's run directory back into one table (summary.csv,
summary.md, summary.json). Torch-, Ray- and matplotlib-free: the REST service serves it."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from dmsae_ray.jsonio import atomic_write_json, atomic_write_text, read_json_or_none
from dmsae_ray.run.sweep_plan import (
    EVAL_METRICS,
    SUMMARY_CSV,
    SUMMARY_JSON,
    SUMMARY_MD,
)

# ----------------------------------------------------------------------------- run dirs


def trial_state(run_dir: str | Path) -> dict | None:
    return read_json_or_none(Path(run_dir) / "state.json")


def trial_done(run_dir: str | Path) -> bool:
    state = trial_state(run_dir)
    return bool(state) and state.get("status") == "completed"


def selected_every_cycle(core_summary: dict | None) -> int | None:
    """Latents in every cycle's core (persistent ids), from ``core/core.json``'s history."""
    if not core_summary or not core_summary.get("history"):
        return None
    sets = [{tuple(i) for i in h} for h in core_summary["history"]]
    return len(set.intersection(*sets))


def cycle_metrics(summary: dict) -> dict[str, Any]:
    """A committed cycle as Tune sees it (flat; no None values)."""
    ev = summary.get("eval") or {}
    out: dict[str, Any] = {
        "cycle": summary["cycle"],
        "core_in": summary.get("core_in"),
        "core_size": summary.get("core_size"),
        "jaccard": summary.get("jaccard"),
        "fraction": summary.get("fraction"),
        "seconds": summary.get("seconds"),
    } | {k: ev.get(k) for k in EVAL_METRICS}
    return {k: v for k, v in out.items() if v is not None}


def trial_row(trial: dict[str, Any], keys: list[str], sweep_dir: Path) -> dict[str, Any]:
    """One summary row, read back from the trial's run directory (the source of truth)."""
    run_dir = Path(trial["run_dir"])
    state = trial_state(run_dir) or {}
    cycles = state.get("cycles") or []
    last = cycles[-1] if cycles else {}
    ev = last.get("eval") or {}
    jac = [c["jaccard"] for c in cycles if c.get("jaccard") is not None]
    core = read_json_or_none(run_dir / "core" / "core.json") if state.get("status") == "completed" \
        else None
    try:
        rel = run_dir.relative_to(sweep_dir).as_posix()
    except ValueError:
        rel = str(run_dir)
    row: dict[str, Any] = {"trial": trial["name"]}
    row |= {k: trial["params"].get(k) for k in keys}
    row |= {
        "status": state.get("status", "pending"),
        "cycles": len(cycles),
        "core_size": last.get("core_size"),
        "fraction": last.get("fraction"),
        "jaccard": last.get("jaccard"),
        "mean_jaccard": sum(jac) / len(jac) if jac else None,
        "selected_every_cycle": selected_every_cycle(core),
    }
    row |= {k: ev.get(k) for k in EVAL_METRICS}
    # The worst cycle, not only the last: a default must hold in every cycle.
    fves = [c["eval"]["fve"] for c in cycles if "fve" in (c.get("eval") or {})]
    core_l0s = [c["eval"]["core_l0"] for c in cycles if "core_l0" in (c.get("eval") or {})]
    row |= {
        "min_fve": min(fves) if fves else None,
        "max_core_l0": max(core_l0s) if core_l0s else None,
        "seconds": sum(c.get("seconds") or 0 for c in cycles) if cycles else None,
        "run_dir": rel,
        "error": state.get("error"),
    }
    return row


def summarize(plan: dict[str, Any], errors: dict[str, str] | None = None) -> dict[str, Any]:
    """The sweep's summary from ``sweep.json``'s plan and the trials' run directories; works
    at any time (pending and running trials have partial rows), without torch or Ray."""
    sweep_dir = Path(plan["sweep_dir"])
    keys = plan["keys"]
    rows, per_cycle = [], {}
    for t in plan["trials"]:
        row = trial_row(t, keys, sweep_dir)
        if errors and t["name"] in errors and row["status"] != "completed" and not row["error"]:
            row["error"] = errors[t["name"]]
        rows.append(row)
        state = trial_state(t["run_dir"]) or {}
        per_cycle[t["name"]] = [
            {
                "cycle": c["cycle"],
                "core_size": c.get("core_size"),
                "jaccard": c.get("jaccard"),
                "fraction": c.get("fraction"),
            }
            for c in state.get("cycles") or []
        ]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "name": plan["name"],
        "keys": keys,
        "trials": len(rows),
        "counts": counts,
        "rows": rows,
        "cycles": per_cycle,
        "updated": time.time(),
    }


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, summary.csv and summary.md, each replaced atomically."""
    atomic_write_json(sweep_dir / SUMMARY_JSON, summary)
    rows = summary["rows"]
    cols = list(rows[0]) if rows else ["trial"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in cols})
    atomic_write_text(sweep_dir / SUMMARY_CSV, buf.getvalue())
    md_cols = [c for c in cols if c not in ("run_dir", "error")]
    lines = [
        f"# Sweep {summary['name']}",
        "",
        f"{summary['trials']} trials: "
        + ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items())),
        "",
        "| " + " | ".join(md_cols) + " |",
        "|" + "|".join("---" for _ in md_cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]).replace("|", "/") for c in md_cols) + " |")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "Errors:", ""] + [f"- `{r['trial']}`: {r['error']}" for r in failed]
    atomic_write_text(sweep_dir / SUMMARY_MD, "\n".join(lines) + "\n")
