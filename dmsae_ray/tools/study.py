"""``dmsae study``: the paper's experiment as one resumable command.

1. the distillation (cycle 0 plus ``distill.cycles``) in ``OUT/distill``;
2. ``dmsae transfer`` over a k grid: baseline, random core and distilled core, ``--seeds`` seeds
   each, in ``OUT/transfer``;
3. ``dmsae report`` of both in ``OUT/report``: core size and Jaccard per cycle, the final core's
   origin cycles, selection counts and densities, metric vs measured-L0 curves with error bars,
   and distilled minus baseline / random with a verdict per metric.

Every run of the study shares one activation cache (``OUT/activations`` unless the config names
one): the training activations are computed once, not once per run. Each step resumes what is
done, so rerunning the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dmsae_ray import __version__
from dmsae_ray.config import ConfigError, RunConfig, load_config
from dmsae_ray.tools.transfer import DEFAULT_SEEDS, run_transfer, summarize

DEFAULT_KS = "16,32,64,128"


def study_overrides(out: Path, cfg: RunConfig, overrides: list[str]) -> list[str]:
    """The caller's overrides plus a shared activation cache under ``out`` (unless one is set)."""
    extra = ["data.cache_activations=true"]
    if cfg.data.activation_cache is None:
        extra.append(f"data.activation_cache={(out / 'activations').resolve()}")
    return [*overrides, *extra]


def distill_config(config: str | None, overrides: list[str], out: Path) -> RunConfig:
    return load_config(config, [*overrides, f"run_dir={(out / 'distill').resolve()}"])


def run_study(
    config: str | None,
    out: str | Path,
    ks: list[int],
    seeds: int = DEFAULT_SEEDS,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Distil, transfer, report; returns the report's files by name."""
    from dmsae_ray.run.pipeline import run
    from dmsae_ray.tools.report import build_report

    out = Path(out)
    # Every run of the study (distillation and transfer) gets the same shared cache.
    overrides = study_overrides(out, load_config(config, overrides), list(overrides or []))
    cfg = distill_config(config, overrides, out)
    if any(k >= cfg.sae.width for k in ks):
        raise ConfigError(f"every --k must be smaller than sae.width={cfg.sae.width} (got {ks})")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log(f"[study] distillation: {cfg.distill.cycles + 1} cycles in {cfg.run_dir}")
    state = run(cfg, log)
    if state["status"] != "completed":
        raise RuntimeError(f"the distillation ended {state['status']}: {state.get('error')}")
    log(f"[study] transfer: k {ks}, {seeds} seeds, in {out / 'transfer'}")
    rows = run_transfer(
        cfg.run_dir, ks, out=out / "transfer", config=config,
        overrides=overrides, seeds=seeds, log=log,
    )
    log(summarize(rows))
    table = out / "transfer" / "transfer.csv"
    files = build_report(cfg.run_dir, transfer=table, out=out / "report")
    record = {
        "command": " ".join(["dmsae", *sys.argv[1:]]) if sys.argv else None,
        "config": config,
        "overrides": overrides,
        "ks": ks,
        "seeds": seeds,
        "dmsae_ray": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs",
        "seconds_this_invocation": round(time.time() - started, 1),
    }
    (out / "study.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"[study] report: {files['summary']}")
    return files

