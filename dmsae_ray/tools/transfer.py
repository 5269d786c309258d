"""``dmsae transfer``: does a distilled core transfer across sparsity levels?

For every k and every seed it trains three final SAEs with the same width, tokens and data, each
a real ``pipeline.run`` with ``distill.cycles: 0`` (seed s sets ``train.seed``):

- ``distilled``: the run's distilled core, frozen (``distill.init_core`` = the core run);
- ``baseline``: a plain Matryoshka BatchTopK SAE (c = 0);
- ``random``: a random core of the same size, frozen: a random subset of the core run's cycle-0
  G_0 latents (its most nested non-core group), a new subset per seed, encoder vectors (and
  biases) copied from that SAE. Those are real learned features from the same candidate pool the
  distillation starts from, so the control isolates *which* latents were kept; random unit
  vectors would instead fire on about half of all tokens and lose for a trivial reason. Each
  subset is written as a stand-alone run directory's ``core/`` so it seeds training exactly
  like a distilled core.

The variants are compared at the same **measured** L0, not at the same k (``compare.py``): every
run records its total and core L0 at inference, and the distilled curve is read against the
baseline and random curves at its own measured L0, with the seeds' standard errors as noise.
Results in the output directory (default ``RUN_DIR/transfer``): ``transfer.csv`` (one row per
run), ``transfer.json`` (rows, points, comparisons) and ``transfer.md``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dmsae_ray.algo.core import Core
from dmsae_ray.config import ConfigError, RunConfig, load_config, validate
from dmsae_ray.jsonio import atomic_write_json, read_json
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.run.runfiles import read_cycles
from dmsae_ray.tools import compare

VARIANTS = ("distilled", "baseline", "random")
# Columns of the per-run table, after k / variant / seed / core_size.
METRICS = (
    "l0",
    "core_l0",
    "l0_overflow",
    "fve",
    "explained_variance",
    "mse",
    "cossim",
    "ce_loss_score",
    "kl_div_score",
    "frac_alive",
    "freq_over_10_percent",
    "l2_ratio",
    "relative_reconstruction_bias",
    "average_max_encoder_cosine_sim",
    "average_max_decoder_cosine_sim",
)
DEFAULT_SEEDS = compare.DEFAULT_SEEDS


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--k must be comma-separated integers (got {text!r})") from None
    if not ks or any(k <= 0 for k in ks):
        raise ConfigError(f"--k must list positive integers (got {text!r})")
    return ks


def base_config(core_run: Path, config: str | None, overrides: list[str]) -> RunConfig:
    """``--config`` if given, else the core run's own config, so width, tokens, data and model
    match the distillation; ``--set`` overrides either."""
    if config is not None:
        return load_config(config, overrides, base=RunConfig())
    rd = RunDir(core_run)
    if not rd.config_path.is_file():
        raise ConfigError(f"--core {core_run} is not a run directory (no config.json)")
    return load_config(None, overrides, base=validate(read_json(rd.config_path)))


def random_core(core_run: Path, size: int, seed: int = 0) -> tuple[Core, dict]:
    """``size`` random latents of the core run's cycle-0 G_0 (then G_1, ... if G_0 is smaller).

    Returns the core (encoder columns [d, size], ids, biases) and a ``core.json``-style summary.
    """
    sae = RunDir(core_run).load_sae(0)
    end = next((e for e in sae.group_ends if e - sae.c >= size), sae.width)
    pool = torch.arange(sae.c, end)
    if len(pool) < size:
        raise ConfigError(f"the cycle-0 SAE has only {len(pool)} non-core latents, need {size}")
    gen = torch.Generator().manual_seed(seed)
    picked = pool[torch.randperm(len(pool), generator=gen)[:size]].sort().values.tolist()
    core = Core.of(sae, picked)
    summary = {
        "ids": [list(i) for i in core.ids],
        "indices": picked,
        "control": "random subset of the cycle-0 SAE's most nested non-core latents",
        "pool": [sae.c, end],
        "seed": seed,
        "source": str(Path(core_run).resolve()),
    }
    return core, summary


def write_random_core(core_run: Path, out: Path, size: int, seed: int) -> Path:
    """A run directory holding only ``core/``: what ``distill.init_core`` reads."""
    root = out / f"random_core_seed{seed}"
    rd = RunDir(root)
    if (rd.core_dir / "encoder.safetensors").is_file():
        prev = read_json(rd.core_dir / "core.json")
        if len(prev["ids"]) == size and prev.get("seed") == seed:
            return root  # a resumed transfer keeps the same control
    core, summary = random_core(core_run, size, seed)
    rd.save_distilled_core(core, summary)
    return root


def variant_config(
    base: RunConfig, k: int, seed: int, init_core: Path | None, run_dir: Path
) -> RunConfig:
    data = base.model_dump(mode="json")
    data["sae"]["k"] = k
    data["sae"]["l0_budget"] = "dynamic"  # a relu core's firings come out of the budget
    data["train"]["seed"] = seed
    data["distill"]["cycles"] = 0
    data["distill"]["init_core"] = str(init_core) if init_core is not None else None
    data["distill"]["max_core"] = None
    data["run_dir"] = str(run_dir)
    return validate(data)


def row_of(k: int, variant: str, seed: int, state: dict, run_dir: Path) -> dict:
    summary = read_cycles(state)[0]
    ev = summary.eval
    row: dict = {"k": k, "variant": variant, "seed": seed, "core_size": summary.core_in}
    row |= {m: ev.get(m, math.nan) for m in METRICS}
    row["run_dir"] = str(run_dir)
    return row


def run_transfer(
    core_run: str | Path,
    ks: list[int],
    out: str | Path | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    variants: tuple[str, ...] = VARIANTS,
    seeds: int = DEFAULT_SEEDS,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train every (k, variant, seed) SAE (resuming what is done) and write the tables.
    Seeds are ``seed, seed + 1, ...``: each one's ``train.seed`` and random-core draw."""
    from dmsae_ray.run.pipeline import run

    core_run = Path(core_run)
    core, _ = RunDir(core_run).load_distilled_core()
    if core.size == 0:
        raise ConfigError(f"{core_run} has an empty distilled core: nothing to transfer")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    out = Path(out) if out is not None else core_run / "transfer"
    base = base_config(core_run, config, overrides or [])
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    for k in ks:
        if k >= base.sae.width:
            raise ConfigError(f"--k {k} must be smaller than sae.width={base.sae.width}")
    core_nf = RunDir(core_run).load_state().get("norm_factor")
    rows = []
    for s in range(seed, seed + seeds):
        inits = {"distilled": core_run, "baseline": None}
        if "random" in variants:
            inits["random"] = write_random_core(core_run, out, core.size, s)
        for k in ks:
            for variant in variants:
                run_dir = out / f"k{k}" / variant / f"seed{s}"
                cfg = variant_config(base, k, s, inits[variant], run_dir)
                log(f"[transfer] k={k} {variant} seed {s}: {run_dir}")
                # Only the trained SAE's evaluation is compared: no attribution, no selection.
                state = run(cfg, log, select=False)
                _check_scale(core_nf, state.get("norm_factor"), run_dir, log)
                rows.append(row_of(k, variant, s, state, run_dir))
                # Written after every run, so an interrupted transfer still leaves a table.
                write_table(rows, out, core_run, core.size)
    return rows


def _check_scale(core_nf: float | None, nf: float | None, run_dir: Path, log: Callable) -> None:
    """A frozen core only means the same thing at the input scale it was trained at; a run on
    other data (or another batch size) estimates another norm factor."""
    if core_nf and nf and abs(nf / core_nf - 1) > 1e-3:
        log(
            f"[transfer] warning: {run_dir} normalises activations by {nf:.4g}, the core run by "
            f"{core_nf:.4g}: its frozen core sees inputs scaled by {core_nf / nf:.3f}"
        )


def analyse(rows: list[dict]) -> tuple[list[compare.Point], dict[str, list[compare.Comparison]]]:
    """Points (mean and SE over seeds per variant and k) and the distilled curve compared with
    each other variant's at its measured L0."""
    points = compare.aggregate(rows, METRICS)
    variants = {p.variant for p in points}
    comparisons = {
        other: compare.compare(points, "distilled", other)
        for other in ("baseline", "random")
        if "distilled" in variants and other in variants
    }
    return points, comparisons


def write_table(rows: list[dict], out: Path, core_run: Path, core_size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = ["k", "variant", "seed", "core_size", *METRICS, "run_dir"]
    tmp = out / ".transfer.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "transfer.csv")
    points, comparisons = analyse(rows)
    meta = {
        "core_run": str(core_run.resolve()),
        "core_size": core_size,
        "rows": rows,
        "points": [asdict(p) for p in points],
        "comparisons": {k: [asdict(c) for c in v] for k, v in comparisons.items()},
        "z": compare.Z,
    }
    atomic_write_json(out / "transfer.json", meta)
    (out / "transfer.md").write_text(markdown(points, comparisons, core_run, core_size))


def read_table(path: str | Path) -> list[dict]:
    """Rows of a ``transfer.csv`` with numbers parsed back (files without a seed column, from
    before seeds existed, read as seed 0)."""
    rows = []
    with Path(path).open(newline="") as fh:
        for r in csv.DictReader(fh):
            row: dict = {"variant": r["variant"], "run_dir": r.get("run_dir", "")}
            row["k"], row["core_size"] = int(r["k"]), int(r["core_size"])
            row["seed"] = int(r.get("seed") or 0)
            row |= {m: _num(r.get(m)) for m in METRICS}
            rows.append(row)
    return rows


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


# The columns of the points table: measured sparsity first, then the headline metrics.
POINT_COLUMNS = ("l0", "core_l0", "l0_overflow", "fve", "ce_loss_score", "kl_div_score",
                 "explained_variance", "mse", "frac_alive", "average_max_decoder_cosine_sim")


def markdown(
    points: list[compare.Point],
    comparisons: dict[str, list[compare.Comparison]],
    core_run: Path,
    core_size: int,
) -> str:
    seeds = sorted({p.n for p in points})
    lines = [
        f"# Transfer of the distilled core of `{core_run}` ({core_size} latents)",
        "",
        "Each point is a final SAE trained with `distill.cycles: 0` at nominal k, as the mean "
        "± standard error over seeds: `distilled` = the frozen distilled core, `baseline` = "
        "plain Matryoshka (c = 0), `random` = a frozen random subset of the cycle-0 SAE's G_0 "
        "latents of the same size (a new subset per seed). Same width, tokens and data. "
        "Metrics are SAEBench core metrics on the run's held-out tokens, at inference (learned "
        f"threshold); L0 is measured, core latents included. Seeds per point: {seeds}.",
        "",
        "| k | variant | seeds | " + " | ".join(POINT_COLUMNS) + " |",
        "|" + "---|" * (3 + len(POINT_COLUMNS)),
    ]
    for p in sorted(points, key=lambda p: (p.k, p.variant)):
        cells = [compare.fmt(p.mean[m], p.se[m]) for m in POINT_COLUMNS]
        lines.append(f"| {p.k} | {p.variant} | {p.n} | " + " | ".join(cells) + " |")
    for other, comps in comparisons.items():
        lines += [
            "",
            f"## Distilled minus {other} at the same measured L0",
            "",
            f"The {other} curve is read at each distilled point's measured L0 (linear in log L0 "
            "between its neighbouring points; outside its range: no comparison). Verdict: the "
            f"difference, signed so that positive is better, beyond {compare.Z:g} × the combined "
            "standard error (`better` / `worse`), else `within noise`. Lower is better for mse "
            "and the max cosine similarities.",
            "",
            *compare.tally_table(comps),
            "",
            *compare.comparison_table(comps, "distilled", other),
        ]
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> str:
    """One line per (k, variant): means over seeds, for the terminal."""
    points, comparisons = analyse(rows)
    lines = [
        f"k={p.k:<5} {p.variant:<9} seeds {p.n} L0 {p.mean['l0']:.1f} "
        f"(core {p.mean['core_l0']:.1f}) FVE {compare.fmt(p.mean['fve'], p.se['fve'])} "
        f"CE rec {compare.fmt(p.mean['ce_loss_score'], p.se['ce_loss_score'])}"
        for p in sorted(points, key=lambda p: (p.k, p.variant))
    ]
    for other, comps in comparisons.items():
        for metric, counts in compare.tally(comps).items():
            if metric in ("fve", "ce_loss_score", "kl_div_score"):
                told = ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
                lines.append(f"distilled vs {other}, {metric}: {told}")
    return "\n".join(lines)
