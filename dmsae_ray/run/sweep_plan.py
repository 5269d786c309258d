"""Sweeps, the plan: one distillation per point of a search space, each a Ray Tune trial.

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

This module plans (spec, validation, trial names and directories); ``sweep_summary`` reads the
trials' run directories back into tables, ``tuning`` runs the plan on Ray Tune, and
``report.write_sweep_plots`` draws it. The planner and the summary import neither torch, Ray
nor matplotlib, so the REST service uses them without loading any of those.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dmsae_ray.config import ConfigError, RunConfig, load_config, read_config_file
from dmsae_ray.jsonio import digest

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
    return f"{readable}-{digest(what)[:8]}"


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
        from dmsae_ray.run.pipeline import preflight

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


