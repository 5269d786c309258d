"""``dmsae transfer``: does a distilled core transfer across sparsity levels (ALGORITHM.md 11)?

For every k it trains three final SAEs with the same width, tokens, data and seed, each a real
``pipeline.run`` with ``distill.cycles: 0``:

- ``distilled``: the run's distilled core, frozen (``distill.init_core`` = the core run);
- ``baseline``: a plain Matryoshka BatchTopK SAE (c = 0);
- ``random``: a random core of the same size, frozen. Control (b) of the spec: a random subset
  of the core run's cycle-0 G_0 latents (its most nested non-core group), encoder vectors copied
  from that SAE. Those are real learned features from the same candidate pool the distillation
  starts from, so the control isolates *which* latents were kept; random unit vectors would
  instead fire on about half of all tokens and lose for a trivial reason. The subset is written
  as a stand-alone run directory's ``core/`` so it seeds training exactly like a distilled core.

Fairness: the dynamic L0 budget is forced, so the total L0 (core included) is matched at k; the
core L0 is reported next to it. Results: ``transfer.csv``, ``transfer.md`` and ``transfer.json``
in the output directory (default ``RUN_DIR/transfer``), one row per (k, variant).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import torch

from dmsae_ray.config import ConfigError, RunConfig, load_config, validate
from dmsae_ray.core import latent_id
from dmsae_ray.rundir import RunDir, atomic_write_json, read_json

VARIANTS = ("distilled", "baseline", "random")
# Columns of the comparison table, after k / variant / core_size.
METRICS = (
    "l0",
    "core_l0",
    "explained_variance",
    "mse",
    "cossim",
    "ce_loss_score",
    "kl_div_score",
    "frac_alive",
    "freq_over_10_percent",
    "l2_ratio",
    "relative_reconstruction_bias",
)
# The headline metrics whose difference to the baseline the markdown shows; all higher-is-better.
DELTAS = ("explained_variance", "cossim", "ce_loss_score", "kl_div_score")


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


def random_core(core_run: Path, size: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``size`` random latents of the core run's cycle-0 G_0 (then G_1, ... if G_0 is smaller).

    Returns the encoder columns [d, size] and a ``core.json``-style summary (ids, indices).
    """
    sae = RunDir(core_run).load_sae(0)
    end = next((e for e in sae.group_ends if e - sae.c >= size), sae.width)
    pool = torch.arange(sae.c, end)
    if len(pool) < size:
        raise ConfigError(f"the cycle-0 SAE has only {len(pool)} non-core latents, need {size}")
    gen = torch.Generator().manual_seed(seed)
    picked = pool[torch.randperm(len(pool), generator=gen)[:size]].sort().values.tolist()
    vectors = sae.W_enc[:, picked].detach().clone()
    summary = {
        "ids": [list(latent_id(sae, i)) for i in picked],
        "indices": picked,
        "control": "random subset of the cycle-0 SAE's most nested non-core latents",
        "pool": [sae.c, end],
        "seed": seed,
        "source": str(Path(core_run).resolve()),
    }
    return vectors, summary


def write_random_core(core_run: Path, out: Path, size: int, seed: int) -> Path:
    """A run directory holding only ``core/``: what ``distill.init_core`` reads."""
    root = out / "random_core"
    rd = RunDir(root)
    if (rd.core_dir / "encoder.safetensors").is_file():
        prev = read_json(rd.core_dir / "core.json")
        if len(prev["ids"]) == size and prev.get("seed") == seed:
            return root  # a resumed transfer keeps the same control
    vectors, summary = random_core(core_run, size, seed)
    rd.save_distilled_core(vectors, summary)
    return root


def variant_config(
    base: RunConfig, k: int, variant: str, init_core: Path | None, run_dir: Path
) -> RunConfig:
    data = base.model_dump(mode="json")
    data["sae"]["k"] = k
    data["sae"]["l0_budget"] = "dynamic"  # total L0 matched at k, core included
    data["distill"]["cycles"] = 0
    data["distill"]["init_core"] = str(init_core) if init_core is not None else None
    data["distill"]["max_core"] = None
    data["run_dir"] = str(run_dir)
    return validate(data)


def row_of(k: int, variant: str, state: dict, run_dir: Path) -> dict:
    summary = state["cycles"][0]
    ev = summary["eval"]
    row: dict = {"k": k, "variant": variant, "core_size": summary["core_in"]}
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
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    from dmsae_ray.pipeline import run

    core_run = Path(core_run)
    _, summary = RunDir(core_run).load_distilled_core()
    core_size = len(summary["ids"])
    if core_size == 0:
        raise ConfigError(f"{core_run} has an empty distilled core: nothing to transfer")
    out = Path(out) if out is not None else core_run / "transfer"
    base = base_config(core_run, config, overrides or [])
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    for k in ks:
        if k >= base.sae.width:
            raise ConfigError(f"--k {k} must be smaller than sae.width={base.sae.width}")
    core_nf = RunDir(core_run).load_state().get("norm_factor")
    inits = {"distilled": core_run, "baseline": None}
    if "random" in variants:
        inits["random"] = write_random_core(core_run, out, core_size, seed)
    rows = []
    for k in ks:
        for variant in variants:
            run_dir = out / f"k{k}" / variant
            cfg = variant_config(base, k, variant, inits[variant], run_dir)
            log(f"[transfer] k={k} {variant}: {run_dir}")
            state = run(cfg, log)
            _check_scale(core_nf, state.get("norm_factor"), run_dir, log)
            rows.append(row_of(k, variant, state, run_dir))
            # Written after every run, so an interrupted sweep still leaves a usable table.
            write_table(rows, out, core_run, core_size)
    return rows


def _check_scale(core_nf: float | None, nf: float | None, run_dir: Path, log: Callable) -> None:
    """A frozen core only means the same thing at the input scale it was trained at; a run on
    other data (or another batch size) estimates another norm factor."""
    if core_nf and nf and abs(nf / core_nf - 1) > 1e-3:
        log(
            f"[transfer] warning: {run_dir} normalises activations by {nf:.4g}, the core run by "
            f"{core_nf:.4g}: its frozen core sees inputs scaled by {core_nf / nf:.3f}"
        )


def write_table(rows: list[dict], out: Path, core_run: Path, core_size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = ["k", "variant", "core_size", *METRICS, "run_dir"]
    tmp = out / ".transfer.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "transfer.csv")
    meta = {"core_run": str(core_run.resolve()), "core_size": core_size, "rows": rows}
    atomic_write_json(out / "transfer.json", meta)
    (out / "transfer.md").write_text(markdown_table(rows, core_run, core_size))


def read_table(path: str | Path) -> list[dict]:
    """Rows of a ``transfer.csv`` with numbers parsed back."""
    rows = []
    with Path(path).open(newline="") as fh:
        for r in csv.DictReader(fh):
            row: dict = {"variant": r["variant"], "run_dir": r.get("run_dir", "")}
            row["k"], row["core_size"] = int(r["k"]), int(r["core_size"])
            row |= {m: _num(r.get(m)) for m in METRICS}
            rows.append(row)
    return rows


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], core_run: Path, core_size: int) -> str:
    cols = ["k", "variant", "core_size", *METRICS]
    lines = [
        f"# Transfer of the distilled core of `{core_run}` ({core_size} latents)",
        "",
        "Each row is a final SAE trained with `distill.cycles: 0`: `distilled` = the frozen "
        "distilled core, `baseline` = plain Matryoshka (c = 0), `random` = a frozen random "
        "subset of the cycle-0 SAE's G_0 latents of the same size. Same width, tokens and seed; "
        "total L0 matched by the dynamic budget (core L0 reported). SAEBench core metrics on "
        "held-out tokens.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    deltas = _delta_rows(rows)
    if deltas:
        lines += ["", "## Difference to the baseline at the same k (higher is better)", ""]
        lines += ["| k | variant | " + " | ".join(f"Δ {m}" for m in DELTAS) + " |"]
        lines += ["|" + "---|" * (2 + len(DELTAS))]
        lines += deltas
    return "\n".join(lines) + "\n"


def _delta_rows(rows: list[dict]) -> list[str]:
    base = {r["k"]: r for r in rows if r["variant"] == "baseline"}
    out = []
    for r in rows:
        b = base.get(r["k"])
        if b is None or r["variant"] == "baseline":
            continue
        ds = [_fmt(r[m] - b[m]) for m in DELTAS]
        out.append(f"| {r['k']} | {r['variant']} | " + " | ".join(ds) + " |")
    return out


def summarize(rows: list[dict]) -> str:
    """One line per (k, variant) for the terminal."""
    return "\n".join(
        f"k={r['k']:<5} {r['variant']:<9} core {r['core_size']:<5} L0 {r['l0']:.1f} "
        f"(core {r['core_l0']:.1f}) EV {r['explained_variance']:.3f} "
        f"CE rec {r['ce_loss_score']:.3f} KL score {r['kl_div_score']:.3f}"
        for r in rows
    )
