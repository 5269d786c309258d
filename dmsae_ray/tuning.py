"""Sweeps: one distillation per point of a search space, each a Ray Tune trial.

``dmsae sweep --config base.yaml --tau 0.5,0.7,0.9 --k 40,80`` expands the search space into an
explicit list of trials before anything runs, validating every trial's config, so a bad grid
fails at once with the field named. Each trial is a Tune *function trainable* that runs the
ordinary pipeline (``pipeline.run``, in-process or on Ray Train as its config says) in its own
run directory ``<sweep_dir>/trials/<name>``, reports every committed cycle to Tune and a final
report with the cores' stability.

A trial's directory name is derived from its parameters and a hash of its full config, so the
same sweep always maps to the same directories. That is what makes a sweep resumable: a rerun
launches only the trials whose run directory is not complete (a completed run would return at
once anyway, but not launching it also spares the model load), each resuming after its last
committed cycle; when the set of unfinished trials is the same as in the interrupted attempt,
Tune's own experiment is restored (``Tuner.restore``), keeping the trials' Tune histories.

Random knobs (``uniform``, ``loguniform``, ``randint``, ``choice`` with ``num_samples``) are
sampled here, seeded by the sweep seed and the grid point, not by Tune: a rerun, or a grid that
grew by one value, samples the same points again and finds their finished runs.

The sweep directory:

    sweep.json                  the plan: spec, base config, every trial's params and run dir
    state.json                  status of the sweep (running, completed, failed, stopped)
    trials/<name>/              one run directory per trial (see README "Outputs")
    tune-<hash>/                Ray Tune's experiment (trial results, restore state)
    summary.csv, summary.md     one row per trial, values read back from the run directories
    summary.json                the same plus per-cycle core size / Jaccard of every trial
    plots/core_size_vs_tau.png  core size, coverage and sparsity against tau, one line per k
    plots/jaccard_vs_cycle.png  stability of the core across cycles, one line per trial

This module imports neither torch, Ray nor matplotlib at import time: the REST service uses
its planning and summary half.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dmsae_ray.config import ConfigError, RunConfig, load_config, read_config_file

Log = Callable[[str], None]

SWEEP_FILE = "sweep.json"
STATE_FILE = "state.json"
REQUEST_FILE = "request.json"
RECORD_FILE = "record.json"
SUMMARY_JSON, SUMMARY_CSV, SUMMARY_MD = "summary.json", "summary.csv", "summary.md"
PLOT_CORE, PLOT_JACCARD = "plots/core_size_vs_tau.png", "plots/jaccard_vs_cycle.png"
TRIALS_DIR = "trials"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
MAX_TRIALS = 1000
# Keys a sweep may not vary: where trials write is the sweep's choice.
RESERVED_KEYS = ("run_dir",)
# Evaluation metrics of a cycle (its summary's `eval`) reported to Tune and tabulated.
EVAL_METRICS = ("l0", "core_l0", "l0_overflow", "fve", "explained_variance", "ce_loss_score")


# ----------------------------------------------------------------------------- errors


class SweepError(ConfigError):
    """An invalid sweep. ``errors`` holds (field path, message) pairs; the REST API turns each
    into a 422 entry, the CLI prints them one per line."""

    def __init__(self, errors: list[tuple[tuple[str, ...], str]]) -> None:
        self.errors = errors
        lines = [f"  {'.'.join(loc)}: {msg}" for loc, msg in errors]
        super().__init__("invalid sweep:\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- the spec


def _flatten(tree: Any, is_leaf: Callable[[Any], bool], prefix: str = "") -> Any:
    """{"distill": {"tau": [...]}} -> {"distill.tau": [...]}: both spellings are accepted."""
    if not isinstance(tree, dict):
        return tree  # let pydantic report the wrong type
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not is_leaf(value):
            out.update(_flatten(value, is_leaf, f"{path}."))
        else:
            out[path] = value
    return out


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _random_leaf(value: dict) -> bool:
    # A section holds mappings only; anything else is a (maybe malformed) distribution, which
    # _check_distribution then names.
    return _is_distribution(value) or not all(isinstance(v, dict) for v in value.values())


class SweepSpec(BaseModel):
    """The ``sweep:`` section of a config file (and of a ``POST /v1/sweeps`` body)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="default sweep directory runs/sweeps/<name>",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="dotted config key -> values; every combination is a trial",
    )
    random: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="dotted config key -> {uniform|loguniform|randint: [low, high]} or "
        "{choice: [values]}; sampled num_samples times per grid point",
    )
    num_samples: int = Field(1, ge=1, le=MAX_TRIALS, description="random draws per grid point")
    seed: int = Field(0, description="seed of the random draws")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials running at once (default: as the cluster's CPUs allow)"
    )
    cpus_per_trial: float | None = Field(
        None, gt=0,
        description="CPUs reserved for a trial's driver (default 1 with ray.enabled false, "
        "where the trial does all the work; 0.01 with Ray, whose workers reserve their own)",
    )
    max_failures: int = Field(0, ge=0, description="Tune retries of a failed trial")

    @field_validator("grid", mode="before")
    @classmethod
    def _flat_grid(cls, v: Any) -> Any:
        return _flatten(v, lambda d: False)

    @field_validator("random", mode="before")
    @classmethod
    def _flat_random(cls, v: Any) -> Any:
        return _flatten(v, _random_leaf)


def _spec(data: dict[str, Any]) -> SweepSpec:
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        errors = []
        for e in err.errors():
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown sweep option (name, grid, random, num_samples, seed, " \
                      "max_concurrent_trials, cpus_per_trial, max_failures)"
            errors.append((("sweep", *(str(p) for p in e["loc"])), msg))
        raise SweepError(errors) from None


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Trial:
    name: str
    params: dict[str, Any]  # dotted key -> value
    run_dir: Path
    config: RunConfig

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "run_dir": str(self.run_dir)}


@dataclass(frozen=True)
class SweepPlan:
    name: str
    sweep_dir: Path
    spec: SweepSpec
    base: RunConfig
    keys: list[str]  # swept keys, grid first
    trials: list[Trial]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sweep_dir": str(self.sweep_dir),
            "spec": self.spec.model_dump(mode="json"),
            "base": self.base.model_dump(mode="json"),
            "keys": self.keys,
            "trials": [t.as_dict() for t in self.trials],
        }


def _check_key(key: str) -> str | None:
    """Why ``key`` cannot be swept, or None: it must name a leaf of the config schema."""
    if key in RESERVED_KEYS:
        return f"{key} is chosen by the sweep (each trial gets its own run directory)"
    node: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return f"unknown config key ({'.'.join(parts[:i])} is not a section)"
        if part not in node.model_fields:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(node.model_fields)
            return f"unknown config key ({where} has {known})"
        ann = node.model_fields[part].annotation
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if node is not None:
        return f"{key} is a section, not a key (e.g. {key}.{next(iter(node.model_fields))})"
    return None


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *sections, leaf = key.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value


def _config_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        out.append(f"{field}: {e['msg'].removeprefix('Value error, ')}")
    return out


def _local_paths_absolute(data: dict[str, Any]) -> None:
    """Trials run in Tune actors whose working directory is not ours: a relative path to a
    local model, dataset or init core would point elsewhere there."""
    for section, key in (("model", "name"), ("data", "dataset"), ("distill", "init_core")):
        value = data.get(section, {}).get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            p = Path(value).expanduser()
            if p.exists():
                data[section][key] = str(p.resolve())
    cache = data.get("data", {}).get("activation_cache")
    if isinstance(cache, str) and "://" not in cache and not Path(cache).is_absolute():
        data["data"]["activation_cache"] = str(Path(cache).expanduser().resolve())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str | int | bool) or value is None:
        return str(value)
    return json.dumps(value, separators=(",", ""))


def trial_name(params: dict[str, Any], cfg: RunConfig) -> str:
    """Readable parameters plus a hash of everything the run computes (its ``ray`` section and
    run_dir left out, as a run directory itself compares configs): equal configs, equal
    names, so reruns find their finished trials, and a changed base config gets new ones."""
    leaves = [k.rsplit(".", 1)[-1] for k in params]
    parts = []
    for key, value in params.items():
        label = key.rsplit(".", 1)[-1] if leaves.count(key.rsplit(".", 1)[-1]) == 1 else key
        parts.append(f"{label}-{_fmt(value)}")
    # No '=': Ray Data's read_parquet takes a `key=value` path component for a hive partition
    # and adds it as a column, which breaks the Ray backend's reads under the run directory.
    readable = re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts))[:80] or "trial"
    what = cfg.model_dump(mode="json", exclude={"ray", "run_dir"})
    return f"{readable}-{_digest(what)[:8]}"


def _sample(dist: dict[str, list[Any]], rng: random.Random) -> Any:
    ((kind, args),) = dist.items()
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randrange(low, high)  # randint: high exclusive, as in Ray Tune


def _check_distribution(dist: dict[str, list[Any]]) -> tuple[str | None, list[Any]]:
    """(error, values worth validating: the bounds or every choice)."""
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        return f"must be one of {{{', '.join(DISTRIBUTIONS)}: ...}} (got {dist!r})", []
    ((kind, args),) = dist.items()
    if kind == "choice":
        return (None, list(args)) if args else ("choice: empty list", [])
    if len(args) != 2 or not all(
        isinstance(a, int | float) and not isinstance(a, bool) for a in args
    ):
        return f"{kind}: expects [low, high] (got {args!r})", []
    low, high = args
    if not low < high:
        return f"{kind}: low must be below high (got {args!r})", []
    if kind == "loguniform" and low <= 0:
        return f"loguniform: low must be > 0 (got {low})", []
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            return f"randint: expects integers (got {args!r})", []
        return None, [low, high - 1]
    return None, [low, high]


def plan_sweep(
    base: RunConfig,
    spec: SweepSpec,
    sweep_dir: str | Path,
    *,
    check_models: bool = False,
) -> SweepPlan:
    """Expand ``spec`` over ``base`` into trials, each config validated; raises
    ``SweepError`` naming the field before anything runs or any file is written.
    ``check_models``: also check model.layer against each model's depth (reads model configs,
    imports transformers; the REST service leaves it to the job)."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    base_data = base.model_dump(mode="json")
    _local_paths_absolute(base_data)
    errors: list[tuple[tuple[str, ...], str]] = []
    if not spec.grid and not spec.random:
        errors.append(
            (("sweep",), "empty search space: give a grid (e.g. --tau 0.5,0.9 or sweep.grid: "
             "{distill.tau: [0.5, 0.9]}) or random knobs")
        )
    for key in set(spec.grid) & set(spec.random):
        errors.append((("sweep", "random", key), "already in sweep.grid; vary a key one way"))

    def check_value(loc: tuple[str, ...], key: str, value: Any) -> None:
        data = json.loads(json.dumps(base_data))
        _set(data, key, value)
        try:
            RunConfig.model_validate(data)
        except ValidationError as err:
            errors.append((loc, f"{value!r} is invalid: " + "; ".join(_config_errors(err))))

    for key, values in spec.grid.items():
        loc = ("sweep", "grid", key)
        if (why := _check_key(key)) is not None:
            errors.append((loc, why))
        elif not values:
            errors.append((loc, "empty list: give at least one value"))
        else:
            seen = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(seen)) != len(seen):
                errors.append((loc, f"duplicate values in {values!r}"))
            for v in values:
                check_value(loc, key, v)
    for key, dist in spec.random.items():
        loc = ("sweep", "random", key)
        if (why := _check_key(key)) is not None:
            errors.append((loc, why))
            continue
        why, probes = _check_distribution(dist)
        if why is not None:
            errors.append((loc, why))
        for v in probes:
            check_value(loc, key, v)
    n_points = math.prod(len(v) for v in spec.grid.values()) * (
        spec.num_samples if spec.random else 1
    )
    if n_points > MAX_TRIALS:
        errors.append((("sweep",), f"{n_points} trials; at most {MAX_TRIALS} per sweep"))
    if errors:
        raise SweepError(errors)

    keys = [*spec.grid, *spec.random]
    trials: list[Trial] = []
    names: set[str] = set()
    grid_keys = list(spec.grid)
    for combo in itertools.product(*(spec.grid[k] for k in grid_keys)):
        point = dict(zip(grid_keys, combo, strict=True))
        for s in range(spec.num_samples if spec.random else 1):
            # Seeded by the grid point too: a grid that grew keeps its earlier draws.
            rng = random.Random(f"{spec.seed}:{json.dumps(point, sort_keys=True)}:{s}")
            params = point | {k: _sample(spec.random[k], rng) for k in sorted(spec.random)}
            params = {k: params[k] for k in keys}
            data = json.loads(json.dumps(base_data))
            for k, v in params.items():
                _set(data, k, v)
            _local_paths_absolute(data)
            try:
                cfg = RunConfig.model_validate(data)
            except ValidationError as err:
                loc = ("sweep", "grid" if grid_keys else "random")
                errors.append((loc, f"trial {params}: " + "; ".join(_config_errors(err))))
                continue
            name = trial_name(params, cfg)
            if name in names:  # random draws that coincide: one run, not two on one dir
                continue
            names.add(name)
            run_dir = sweep_dir / TRIALS_DIR / name
            cfg = RunConfig.model_validate(cfg.model_dump(mode="json") | {"run_dir": str(run_dir)})
            trials.append(Trial(name, params, run_dir, cfg))
    if errors:
        raise SweepError(errors[:20])
    if check_models:
        from dmsae_ray.pipeline import preflight

        seen_models: set[tuple[str, int]] = set()
        for t in trials:
            m = (t.config.model.name, t.config.model.layer)
            if m not in seen_models:
                seen_models.add(m)
                preflight(t.config)
    return SweepPlan(spec.name or sweep_dir.name, sweep_dir, spec, base, keys, trials)


# ----------------------------------------------------------------------------- loading


def parse_values(text: str) -> list[Any]:
    """'0.5,0.7' -> [0.5, 0.7]; '[a, b]' (YAML) for values that contain commas."""
    text = text.strip()
    if text.startswith("["):
        values = yaml.safe_load(text)
        return values if isinstance(values, list) else [values]
    return [yaml.safe_load(v) for v in text.split(",") if v.strip()]


def read_sections(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config file's ``sweep:`` section; the rest is read by ``load_config``."""
    data = read_config_file(path)
    sweep = data.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise SweepError([(("sweep",), "must be a mapping (name, grid, random, ...)")])
    return data, sweep


def load_sweep(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    grid: dict[str, list[Any]] | None = None,
    options: dict[str, Any] | None = None,
    sweep_dir: str | Path | None = None,
    *,
    check_models: bool = False,
) -> SweepPlan:
    """Base config (file + ``--set`` overrides; the embedded default without a file), the
    file's ``sweep:`` section, then the command line's grid (which wins key by key) and
    options (``num_samples``, ``max_concurrent_trials``, ...; None values ignored)."""
    sweep_data: dict[str, Any] = {}
    if config is not None:
        _, sweep_data = read_sections(config)
    base = load_config(config, overrides, base=RunConfig() if config else None)
    sweep_data = dict(sweep_data)
    if grid:
        merged = _flatten(sweep_data.get("grid") or {}, lambda d: False)
        if not isinstance(merged, dict):
            merged = {}
        sweep_data["grid"] = merged | grid
    sweep_data |= {k: v for k, v in (options or {}).items() if v is not None}
    spec = _spec(sweep_data)
    if sweep_dir is None:
        name = spec.name or (Path(config).stem if config else "embedded")
        sweep_dir = Path("runs/sweeps") / name
    return plan_sweep(base, spec, sweep_dir, check_models=check_models)


# ----------------------------------------------------------------------------- run dirs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: Any) -> None:
    from dmsae_ray.rundir import atomic_write_json

    atomic_write_json(path, data)


def trial_state(run_dir: str | Path) -> dict | None:
    return _read_json(Path(run_dir) / "state.json")


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
    core = _read_json(run_dir / "core" / "core.json") if state.get("status") == "completed" \
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
    _write_json(sweep_dir / SUMMARY_JSON, summary)
    rows = summary["rows"]
    cols = list(rows[0]) if rows else ["trial"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in cols})
    _write_text(sweep_dir / SUMMARY_CSV, buf.getvalue())
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
    _write_text(sweep_dir / SUMMARY_MD, "\n".join(lines) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- plots


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_plots(sweep_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """Core size / coverage / sparsity against tau (or the first numeric swept key), one line
    per combination of the other swept keys (per k in a tau x k grid); and Jaccard against
    cycle per trial. Figures through the Agg canvas: no display, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in summary["rows"] if r["status"] == "completed"]
    keys = summary["keys"]
    numeric = [k for k in keys if rows and all(_numeric(r[k]) for r in rows)]
    xkey = "distill.tau" if "distill.tau" in numeric else (numeric[0] if numeric else None)
    others = [k for k in keys if k != xkey]
    out = []

    fig = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (
        ("core size", "core_size", "selected_every_cycle",
         "solid: final core, dashed: selected in every cycle"),
        ("coverage", "fve", "ce_loss_score",
         "solid: variance explained, dashed: CE loss recovered"),
        ("sparsity", "l0", "core_l0", "solid: L0, dashed: core L0"),
    )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in others), []).append(r)
    # Numeric order (k=40 before k=160), whatever the types of the values.
    order = sorted(groups, key=lambda g: [(not _numeric(v), v if _numeric(v) else str(v))
                                          for v in g])
    colors = _colors(len(order))
    for ax, (title, solid, dashed, styles) in zip(axes, panels, strict=True):
        for color, group in zip(colors, order, strict=True):
            rs = groups[group]
            if xkey:
                rs = sorted(rs, key=lambda r: r[xkey])
                xs: list[Any] = [r[xkey] for r in rs]
            else:
                xs = [r["trial"].rsplit("-", 1)[0] for r in rs]
            label = ", ".join(
                f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in zip(others, group, strict=True)
            )
            for metric, style in ((solid, "-"), (dashed, "--")):
                ys = [r[metric] if r[metric] is not None else math.nan for r in rs]
                ax.plot(xs, ys, style, marker="o", color=color,
                        label=label if style == "-" and label else "_nolegend_")
        ax.set_title(f"{title}\n({styles})", fontsize=10)
        ax.set_xlabel(xkey or "trial")
        ax.grid(alpha=0.3)
        if not xkey:
            ax.tick_params(axis="x", labelrotation=45)
    if others and rows:
        axes[0].legend(fontsize=7)
    if not rows:
        fig.suptitle("no completed trial yet")
    path = sweep_dir / PLOT_CORE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    out.append(path)

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    plotted = False
    series = summary["cycles"]  # in the plan's order
    for color, (name, cycles) in zip(_colors(len(series)), series.items(), strict=True):
        pts = [(c["cycle"], c["jaccard"]) for c in cycles if c.get("jaccard") is not None]
        if pts:
            label = name.rsplit("-", 1)[0]  # the parameters, without the config hash
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=label)
            plotted = True
    ax.set_xlabel("cycle")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Jaccard to the previous core")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=6, ncol=2 if len(series) > 12 else 1)
    else:
        ax.set_title("no distillation cycle committed yet (Jaccard starts at cycle 1)")
    path = sweep_dir / PLOT_JACCARD
    fig.savefig(path, dpi=100)
    out.append(path)
    return out


# ----------------------------------------------------------------------------- running


@dataclass
class SweepOutcome:
    plan: SweepPlan
    summary: dict[str, Any]
    skipped: list[str]  # trials complete before this call, not launched
    launched: list[str]
    results: Any = None  # the ResultGrid of the Tune experiment, when one ran
    experiment: Path | None = None

    @property
    def ok(self) -> bool:
        return self.summary["counts"].get("completed", 0) == self.summary["trials"]

    @property
    def interrupted(self) -> bool:
        return not self.ok and not any(r.get("error") for r in self.summary["rows"])


def _distill(cfg_json: dict, name: str, on_cycle: Callable[[dict], None]) -> dict:
    from dmsae_ray.config import validate
    from dmsae_ray.pipeline import run

    def log(line: str) -> None:
        print(f"[{name}] {line}", flush=True)

    return run(validate(cfg_json), log=log, on_cycle=on_cycle)


class _TrialDriver:
    """Runs a Ray-backed trial's pipeline beside the trial (see ``_run_beside``); made a Ray
    actor class only when used, so that this module does not import Ray."""

    def __init__(self) -> None:
        self.cycles: list[dict] = []

    def run(self, cfg_json: dict, name: str) -> dict:
        return _distill(cfg_json, name, self.cycles.append)

    def cycles_from(self, n: int) -> list[dict]:
        return self.cycles[n:]


def _run_beside(cfg_json: dict, name: str, on_cycle: Callable[[dict], None]) -> dict:
    """A Tune trial's child tasks and actors are captured into the trial's placement group,
    which holds the trial driver's token CPU only: the pipeline's own actors (scoring pool)
    could never be placed there. So the pipeline runs in an actor scheduled outside it (Ray
    Train and Ray Data place their workers themselves), owned by the trial so that it dies
    with it; its committed cycles are polled back and reported from the trial."""
    import ray

    actor = ray.remote(_TrialDriver).options(
        num_cpus=0, max_concurrency=2, scheduling_strategy="DEFAULT"
    ).remote()
    ref = actor.run.remote(cfg_json, name)
    sent = 0
    while True:
        done, _ = ray.wait([ref], timeout=2.0)
        for summary in ray.get(actor.cycles_from.remote(sent)):
            on_cycle(summary)
            sent += 1
        if done:
            return ray.get(ref)  # raises the run's error, which fails the trial


def _tune_trial(config: dict[str, Any], configs: dict[str, dict], threads: int) -> None:
    """The Tune function trainable: one distillation, reported per committed cycle."""
    from ray import tune

    name = config["trial"]["name"]
    cfg_json = configs[name]

    def on_cycle(summary: dict) -> None:
        tune.report(cycle_metrics(summary))

    if cfg_json["ray"]["enabled"]:
        state = _run_beside(cfg_json, name, on_cycle)
    else:
        import torch

        # The trial reserved `threads` CPUs and does all the work; more threads only fight
        # the other trials.
        torch.set_num_threads(threads)
        state = _distill(cfg_json, name, on_cycle)
    core = _read_json(Path(cfg_json["run_dir"]) / "core" / "core.json")
    final = cycle_metrics(state["cycles"][-1]) if state["cycles"] else {}
    tune.report(
        final
        | {
            "final": 1,
            "cycles_committed": len(state["cycles"]),
            "selected_every_cycle": selected_every_cycle(core),
            "core_size_per_cycle": [c["core_size"] for c in state["cycles"]],
        }
    )


def _tune_dirname(trial: Any) -> str:
    return trial.config["trial"]["name"]


def _run_tune(plan: SweepPlan, pending: list[Trial], log: Log) -> tuple[Any, Path, dict]:
    from ray import tune

    cpus = plan.spec.cpus_per_trial or (0.01 if plan.base.ray.enabled else 1.0)
    trainable = tune.with_resources(
        tune.with_parameters(
            _tune_trial,
            configs={t.name: t.config.model_dump(mode="json") for t in pending},
            threads=max(1, int(cpus)),
        ),
        {"CPU": cpus},
    )
    # One Tune experiment per set of unfinished trials: a rerun after an interruption with the
    # same trials still open restores it; any other set is a new, smaller experiment.
    name = "tune-" + _digest(sorted(t.name for t in pending))[:10]
    exp_dir = plan.sweep_dir / name
    # A driver killed before Tune's first experiment checkpoint leaves tuner.pkl without trial
    # state, which restore refuses: start that experiment afresh.
    from ray.tune.execution.tune_controller import TuneController

    saved = any(exp_dir.glob(TuneController.CKPT_FILE_TMPL.format("*")))
    if saved and tune.Tuner.can_restore(exp_dir):
        log(f"restoring the Tune experiment {exp_dir}")
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable=trainable, resume_unfinished=True, restart_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "trial": tune.grid_search([{"name": t.name, "params": t.params} for t in pending])
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=plan.spec.max_concurrent_trials,
                trial_dirname_creator=_tune_dirname,
                trial_name_creator=_tune_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(plan.sweep_dir),
                failure_config=tune.FailureConfig(max_failures=plan.spec.max_failures),
                verbose=1,
            ),
        )
    results = tuner.fit()
    errors = {}
    for r in results:
        if r.error is not None:
            errors[r.config["trial"]["name"]] = f"{type(r.error).__name__}: {r.error}"[:2000]
    return results, exp_dir, errors


def _save_state(sweep_dir: Path, **fields: Any) -> dict:
    state = _read_json(sweep_dir / STATE_FILE) or {}
    state |= fields | {"updated": time.time()}
    _write_json(sweep_dir / STATE_FILE, state)
    return state


def report(plan: SweepPlan, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Summary table and plots of the sweep as its run directories stand now."""
    summary = summarize(plan.as_dict(), errors)
    write_summary(plan.sweep_dir, summary)
    write_plots(plan.sweep_dir, summary)
    return summary


def run_sweep(plan: SweepPlan, log: Log = print) -> SweepOutcome:
    """Run (or resume) a sweep: launch the trials whose run directory is not complete as Ray
    Tune trials, then write the summary and plots. Connects to Ray (``plan.base.ray``: an
    address, $RAY_ADDRESS or a local cluster) unless already connected."""
    sweep_dir = plan.sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep_dir / SWEEP_FILE, plan.as_dict())
    skipped = [t.name for t in plan.trials if trial_done(t.run_dir)]
    pending = [t for t in plan.trials if t.name not in skipped]
    log(
        f"sweep {plan.name}: {len(plan.trials)} trials over {', '.join(plan.keys)}; "
        f"{len(skipped)} already complete, {len(pending)} to run -> {sweep_dir}"
    )
    _save_state(
        sweep_dir, status="running", error=None, trials=len(plan.trials), started=time.time()
    )
    results, exp_dir, errors = None, None, {}
    try:
        if pending:
            from dmsae_ray.ray_utils import connect

            connect(plan.base.ray)
            results, exp_dir, errors = _run_tune(plan, pending, log)
        summary = report(plan, errors)
    except KeyboardInterrupt:
        _finish_interrupted(plan, "stopped", None)
        raise
    except Exception as err:
        _finish_interrupted(plan, "failed", f"{type(err).__name__}: {err}")
        raise
    counts = summary["counts"]
    bad = [r for r in summary["rows"] if r["status"] != "completed"]
    failed = [r for r in bad if r.get("error")]
    error = None
    if failed:
        error = f"{len(failed)} of {len(summary['rows'])} trials failed: " + "; ".join(
            f"{r['trial']}: {r['error']}" for r in failed[:5]
        )
    # Tune ends a run on Ctrl-C by stopping its trials and returning normally: unfinished
    # trials without an error mean the sweep was interrupted, not that it failed.
    status = "failed" if failed else "stopped" if bad else "completed"
    if status == "stopped":
        log(f"interrupted: {len(bad)} trials unfinished; run the same command to resume")
    _save_state(
        sweep_dir,
        status=status,
        error=error,
        counts=counts,
        experiment=str(exp_dir) if exp_dir else None,
    )
    return SweepOutcome(plan, summary, skipped, [t.name for t in pending], results, exp_dir)


def _finish_interrupted(plan: SweepPlan, status: str, error: str | None) -> None:
    try:  # what the run directories hold so far is still worth a table
        report(plan)
    except Exception:  # noqa: BLE001 - the original error matters more
        pass
    _save_state(plan.sweep_dir, status=status, error=error)


# ----------------------------------------------------------------------------- CLI


SWEEP_HELP = """\
Run one distillation per point of a search space as Ray Tune trials, each in its own run
directory under the sweep directory, then write summary.csv/.md/.json and plots there.

The search space comes from the config's `sweep:` section and the command line (which wins key
by key):
  sweep:
    grid:   {distill.tau: [0.5, 0.7, 0.9], sae.k: [40, 80]}    # every combination
    random: {train.lr: {loguniform: [1.0e-4, 1.0e-2]},         # drawn num_samples times
             attribution.pooling: {choice: [quantile, mean]}}  # per grid point
    num_samples: 2
    max_concurrent_trials: 2
Examples:
  dmsae sweep --config base.yaml --tau 0.5,0.7,0.8,0.9,0.95 --k 40,80,160,320
  dmsae sweep --config base.yaml --grid train.lr=1e-4,3e-4 --max-concurrent-trials 2
Running the same command again resumes: finished trials are not rerun.
"""


def add_arguments(p: Any) -> None:
    """`dmsae sweep` options (the base config options are the same as `dmsae run`'s)."""
    p.add_argument("--config", "-c", help="base config with an optional sweep: section")
    p.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE",
        help="override a key of the base config (repeatable)",
    )
    p.add_argument("--tau", help="grid over distill.tau, e.g. 0.5,0.7,0.9")
    p.add_argument("--k", help="grid over sae.k, e.g. 40,80,160")
    p.add_argument(
        "--grid", "-g", action="append", default=[], metavar="KEY=V1,V2",
        help="grid over any dotted config key (repeatable)",
    )
    p.add_argument("--num-samples", type=int, help="random draws per grid point")
    p.add_argument("--seed", type=int, help="seed of the random draws")
    p.add_argument("--max-concurrent-trials", type=int, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs reserved per trial driver")
    p.add_argument("--name", help="sweep name (default: the config file's stem)")
    p.add_argument("--sweep-dir", help="default runs/sweeps/<name>")
    p.add_argument("--dry-run", action="store_true", help="print the trials and stop")


def plan_from_args(args: Any) -> SweepPlan:
    grid: dict[str, list[Any]] = {}
    for text in args.grid:
        if "=" not in text:
            raise ConfigError(f"--grid {text!r} must look like section.key=V1,V2")
        key, values = text.split("=", 1)
        grid[key.strip()] = parse_values(values)
    if args.tau is not None:
        grid["distill.tau"] = parse_values(args.tau)
    if args.k is not None:
        grid["sae.k"] = parse_values(args.k)
    options = {
        "num_samples": args.num_samples,
        "seed": args.seed,
        "max_concurrent_trials": args.max_concurrent_trials,
        "cpus_per_trial": args.cpus_per_trial,
        "name": args.name,
    }
    return load_sweep(
        args.config, args.set, grid, options, args.sweep_dir, check_models=not args.dry_run
    )


def main(args: Any, log: Log = print) -> int:
    plan = plan_from_args(args)
    if args.dry_run:
        log(f"sweep {plan.name} -> {plan.sweep_dir}: {len(plan.trials)} trials")
        for t in plan.trials:
            state = "complete" if trial_done(t.run_dir) else "to run"
            log(f"  {t.name}  {json.dumps(t.params)}  ({state})")
        return 0
    outcome = run_sweep(plan, log)
    log((plan.sweep_dir / SUMMARY_MD).read_text())
    log(f"summary: {plan.sweep_dir / SUMMARY_CSV}; plots: {plan.sweep_dir / 'plots'}")
    return 0 if outcome.ok else 130 if outcome.interrupted else 1
