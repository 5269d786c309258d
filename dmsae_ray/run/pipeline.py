"""The distillation cycle loop: data -> train -> evaluate -> attribute -> select -> transfer.

One cycle at a time, each committed to the run directory before the next starts, so a rerun
with the same run_dir resumes after the last committed cycle. The stages run on a backend:
``RayBackend`` (Ray Data, Ray Train, actor pools, a coordinator actor that owns the state) or
``LocalBackend`` (everything in this process, ``ray.enabled: false``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor

from dmsae_ray.algo.core import Core, CoreSelection, jaccard, select_core, selection_counts
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import ConfigError, RunConfig, check_layer
from dmsae_ray.model.lm import num_layers_of
from dmsae_ray.run.heartbeat import Heartbeat
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.run.runfiles import COMPLETED, FAILED, RUNNING, STOPPED, CycleSummary, read_cycles

Log = Callable[[str], None]


class State(Protocol):
    def get(self) -> dict: ...
    def update(self, **fields: object) -> dict: ...
    def set_stage(self, stage: str | None, **progress: object) -> dict: ...
    def commit_cycle(self, summary: dict) -> dict: ...


class Backend(Protocol):
    d_in: int

    def open_state(self) -> State: ...
    def norm_factor(self) -> float: ...
    def train(
        self, cycle: int, core: Core | None, norm_factor: float
    ) -> tuple[MatryoshkaBatchTopKSAE, dict]: ...
    def evaluate(self, sae: MatryoshkaBatchTopKSAE, norm_factor: float) -> dict: ...
    def attribute(self, sae: MatryoshkaBatchTopKSAE, norm_factor: float) -> Tensor: ...
    def close(self) -> None: ...


def preflight(cfg: RunConfig) -> None:
    """Everything that can be checked before any work or any file is written."""
    check_layer(cfg, num_layers_of(cfg.model))
    if cfg.distill.init_core is not None:
        core, _ = RunDir(cfg.distill.init_core).load_distilled_core()
        n_groups = len(cfg.sae.group_fractions)
        if core.size + n_groups > cfg.sae.width:
            raise ConfigError(
                f"invalid config:\n  sae.width: {cfg.sae.width} is too small for the "
                f"{core.size}-latent core of distill.init_core plus {n_groups} groups"
            )


def make_backend(cfg: RunConfig, rd: RunDir, log: Log) -> Backend:
    if cfg.ray.enabled:
        from dmsae_ray.distributed.ray_backend import RayBackend

        return RayBackend(cfg, rd, log)
    from dmsae_ray.run.local_backend import LocalBackend

    return LocalBackend(cfg, rd, log)


def norm_factor_of(cfg: RunConfig, backend: Backend, state: State) -> float:
    """Estimated once, in cycle 0, and reused: frozen core encoders need a fixed input scale."""
    nf = state.get()["norm_factor"]
    if nf is None and cfg.distill.init_core is not None:
        # An inherited core's frozen encoders only make sense in the scale they were trained in.
        nf = RunDir(cfg.distill.init_core).load_state()["norm_factor"]
    if nf is None:
        state.set_stage("norm_factor")
        nf = backend.norm_factor() if cfg.sae.normalize_activations else 1.0
    if state.get()["norm_factor"] is None:
        state.update(norm_factor=nf)
    return float(nf)


def previous_core(cfg: RunConfig, rd: RunDir, cycle: int) -> Core | None:
    """What cycle ``cycle`` starts from: the last cycle's selection, or in cycle 0 the
    ``distill.init_core`` run's distilled core; None when there is none (or it is empty)."""
    if cycle == 0:
        if cfg.distill.init_core is None:
            return None
        core, _ = RunDir(cfg.distill.init_core).load_distilled_core()
    else:
        core = rd.load_cycle_core(cycle - 1)
    return core if core.size else None


def run_cycle(
    cfg: RunConfig, rd: RunDir, backend: Backend, state: State, cycle: int, log: Log,
    select: bool = True,
) -> CycleSummary:
    """One cycle: train, evaluate, attribute, select, write, return its summary (the commit is
    the caller's; the summary has no ``seconds`` yet). ``select=False`` skips attribution and
    selects nothing: for SAEs whose evaluation is all that is wanted (``dmsae transfer``),
    attribution through the full LM is the most expensive stage."""
    norm_factor = norm_factor_of(cfg, backend, state)
    core = previous_core(cfg, rd, cycle)
    core_ids = [] if core is None else core.ids
    log(f"[cycle {cycle}] training: core {len(core_ids)}, {cfg.train.tokens_per_cycle} tokens")
    sae, train_metrics = backend.train(cycle, core, norm_factor)
    state.set_stage("evaluate", cycle=cycle)
    metrics = backend.evaluate(sae, norm_factor)
    # Per-latent, so it goes with the selection in core.json, not into every state.json write.
    density = metrics.pop("candidate_density", None)
    if select:
        state.set_stage("attribute", cycle=cycle)
        pooled = backend.attribute(sae, norm_factor)
        sel = select_core(
            sae, pooled, cfg.distill.tau, cfg.distill.core_mode, cfg.distill.max_core
        )
    else:
        sel = CoreSelection(indices=[], ids=[], scores=[], fraction=None, candidate_scores=[])
    n = sae.nested_width
    summary = CycleSummary(
        cycle=cycle,
        core_in=len(core_ids),
        core_size=len(sel.ids),
        jaccard=jaccard(sel.ids, core_ids) if cycle > 0 else None,
        fraction=sel.fraction,
        train=train_metrics,
        eval=metrics,
    )
    core_out = {
        "cycle": cycle,
        "indices": sel.indices,
        "ids": [list(i) for i in sel.ids],
        "scores": sel.scores,
        "fraction": sel.fraction,
        "tau": cfg.distill.tau,
        "candidate_ids": [
            [int(a), int(b)]
            for a, b in zip(
                sae.origin_cycle[:n].tolist(), sae.origin_index[:n].tolist(), strict=True
            )
        ],
        "candidate_scores": sel.candidate_scores,
        "densities": None if density is None else [density[i] for i in sel.indices],
    }
    rd.save_cycle(
        cycle, sae, cfg, norm_factor, core_ids, core_out, Core.of(sae, sel.indices),
        summary.to_dict(),
    )
    return summary


def format_summary(s: CycleSummary) -> str:
    jac = "-" if s.jaccard is None else f"{s.jaccard:.3f}"
    frac = "no selection" if s.fraction is None else f"attribution {s.fraction:.3f}"
    ev = s.eval
    over = ev.get("l0_overflow", 0.0)
    # A relu core firing past k takes L0 the budget cannot absorb: say so on the line itself.
    overflow = f", over k by {over:.1f}!" if over > 0 else ""
    return (
        f"[cycle {s.cycle}] core {s.core_in} -> {s.core_size} "
        f"({frac}), jaccard {jac}, L0 {ev['l0']:.1f} "
        f"(core {ev['core_l0']:.1f}{overflow}), FVE {ev['fve']:.3f}, "
        f"CE recovered {ev['ce_loss_score']:.3f}"
    )


def finish(rd: RunDir, state: dict) -> None:
    """The distilled core: the last cycle's selection, with counts and origins over cycles."""
    cycles = read_cycles(state)
    n = len(cycles)
    history = [[tuple(i) for i in rd.load_core(c)["ids"]] for c in range(n)]
    counts = selection_counts(history)
    last = rd.load_core(n - 1)
    rd.save_distilled_core(
        rd.load_cycle_core(n - 1),
        {
            "ids": last["ids"],
            "scores": last["scores"],
            "selection_counts": [counts[tuple(i)] for i in last["ids"]],
            "origin_cycle": [i[0] for i in last["ids"]],
            "core_size_per_cycle": [len(h) for h in history],
            "jaccard_per_cycle": [s.jaccard for s in cycles],
            "history": [[list(i) for i in h] for h in history],
        },
    )


def run(
    cfg: RunConfig,
    log: Log = print,
    on_cycle: Callable[[dict], None] | None = None,
    select: bool = True,
) -> dict:
    """Run (or resume) a distillation; returns the final state. ``on_cycle`` gets each cycle's
    summary once it is committed (a sweep reports it to Ray Tune)."""
    preflight(cfg)
    rd = RunDir(cfg.run_dir)
    if rd.load_state()["status"] == COMPLETED:
        rd.init(cfg)  # still refuses a changed config
        log(f"{rd.root}: already completed")
        return rd.load_state()
    torch.manual_seed(cfg.train.seed)
    log(f"loading {cfg.model.name} and {cfg.data.dataset}")
    backend = make_backend(cfg, rd, log)
    try:
        # Only now, with model and data known to load, does the run directory come into being.
        cfg = rd.init(cfg)
        state = backend.open_state()
        # Beats while this driver works, so a reader can tell a run that stopped without
        # recording its end (SIGKILL, a lost node) from one that runs (dmsae_ray/run/heartbeat.py).
        with Heartbeat(rd.root):
            return _loop(cfg, rd, backend, state, log, on_cycle, select)
    finally:
        backend.close()


def _loop(
    cfg: RunConfig,
    rd: RunDir,
    backend: Backend,
    state: State,
    log: Log,
    on_cycle: Callable[[dict], None] | None = None,
    select: bool = True,
) -> dict:
    start = state.get()["cycle"]
    if start:
        log(f"resuming {rd.root} after cycle {start - 1}")
    state.update(status=RUNNING, error=None, d_in=backend.d_in)
    try:
        for cycle in range(start, cfg.distill.cycles + 1):
            t0 = time.time()
            summary = run_cycle(cfg, rd, backend, state, cycle, log, select)
            summary = replace(summary, seconds=time.time() - t0)
            # A plain dict crosses to the state's owner (the coordinator actor on Ray) and to
            # on_cycle (Ray Tune reports it).
            committed = summary.to_dict()
            state.commit_cycle(committed)
            log(format_summary(summary))
            if on_cycle is not None:
                on_cycle(committed)
        finish(rd, state.get())
        final = state.update(status=COMPLETED, stage=None)
    except KeyboardInterrupt:
        state.update(status=STOPPED)
        raise
    except Exception as err:
        state.update(status=FAILED, error=f"{type(err).__name__}: {err}")
        raise
    log(f"distilled core: {read_cycles(final)[-1].core_size} latents -> {rd.core_dir}")
    return final
