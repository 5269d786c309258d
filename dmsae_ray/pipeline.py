"""The distillation cycle loop: data -> train -> evaluate -> attribute -> select -> transfer.

One cycle at a time, each committed to the run directory before the next starts, so a rerun
with the same run_dir resumes after the last committed cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dmsae_ray.attribution import attribute
from dmsae_ray.buffer import CachedActivations, iter_activations, shuffled_batches
from dmsae_ray.config import RunConfig, check_layer
from dmsae_ray.core import (
    LatentId,
    build_sae,
    core_vectors,
    jaccard,
    select_core,
    selection_counts,
)
from dmsae_ray.data import TokenData, load_token_data
from dmsae_ray.evaluate import evaluate_sae
from dmsae_ray.lm import load_lm, load_tokenizer, num_layers_of
from dmsae_ray.rundir import RunDir
from dmsae_ray.trainer import estimate_norm_factor, repeat_batches, train_cycle

Log = Callable[[str], None]


def preflight(cfg: RunConfig) -> None:
    """Everything that can be checked before any work or any file is written."""
    check_layer(cfg, num_layers_of(cfg.model))


@dataclass
class Context:
    cfg: RunConfig
    rd: RunDir
    model: nn.Module
    data: TokenData
    state: dict
    log: Log

    def set_stage(self, stage: str, **progress: object) -> None:
        self.state["stage"] = stage
        self.state["progress"] = progress | {"updated": time.time()}
        self.rd.save_state(self.state)


def _training_rows(ctx: Context) -> Iterator[Tensor]:
    cfg = ctx.cfg
    return iter_activations(
        ctx.model,
        ctx.data.train_blocks(),
        cfg.model.layer,
        ctx.data.specials,
        cfg.data.llm_batch_size,
    )


def training_batches(ctx: Context, cycle: int, norm_factor: float) -> Iterator[Tensor]:
    cfg = ctx.cfg
    seed = cfg.train.seed + cycle
    if cfg.data.cache_activations:
        cache = CachedActivations(ctx.rd.activations_path)
        if not cache.exists():
            ctx.set_stage("activations")
            cache.build(_training_rows(ctx), cfg.train.tokens_per_cycle, ctx.log)
        acts = cache.load() / norm_factor
        return CachedActivations.epochs(acts, cfg.train.batch_size, seed)
    buffer_rows = max(32 * cfg.train.batch_size, 4 * cfg.data.context_length)
    batches = repeat_batches(
        lambda: shuffled_batches(_training_rows(ctx), cfg.train.batch_size, buffer_rows, seed)
    )
    return (b / norm_factor for b in batches)


def norm_factor_of(ctx: Context) -> float:
    """Estimated once, in cycle 0, and reused: frozen core encoders need a fixed input scale."""
    if ctx.state["norm_factor"] is None:
        cfg = ctx.cfg
        if not cfg.sae.normalize_activations:
            ctx.state["norm_factor"] = 1.0
        else:
            ctx.set_stage("norm_factor")
            rows = shuffled_batches(
                _training_rows(ctx), cfg.train.batch_size, cfg.train.batch_size, 0
            )
            ctx.state["norm_factor"] = estimate_norm_factor(rows, cfg.sae.norm_batches)
        ctx.rd.save_state(ctx.state)
    return float(ctx.state["norm_factor"])


def previous_core(ctx: Context, cycle: int) -> tuple[Tensor | None, list[LatentId]]:
    if cycle == 0:
        if ctx.cfg.distill.init_core is None:
            return None, []
        vectors, summary = RunDir(ctx.cfg.distill.init_core).load_distilled_core()
        return vectors, [tuple(i) for i in summary["ids"]]
    vectors = ctx.rd.load_core_encoder(cycle - 1)
    return vectors, [tuple(i) for i in ctx.rd.load_core(cycle - 1)["ids"]]


def run_cycle(ctx: Context, cycle: int) -> dict:
    cfg, log = ctx.cfg, ctx.log
    norm_factor = norm_factor_of(ctx)
    core, core_ids = previous_core(ctx, cycle)
    d_in = int(ctx.state["d_in"])
    if core is not None and core.shape[1] == 0:
        core = None
    sae = build_sae(cfg, d_in, cycle, core, core_ids)
    label = f"[cycle {cycle}] "
    log(f"{label}training: core {sae.c}, groups {sae.groups}, {cfg.train.tokens_per_cycle} tokens")
    ctx.set_stage("train", cycle=cycle)
    train_metrics = train_cycle(
        sae, training_batches(ctx, cycle, norm_factor), cfg.sae, cfg.train, log, label
    )
    sae.eval()
    ctx.set_stage("evaluate", cycle=cycle)
    metrics = evaluate_sae(
        ctx.model,
        sae,
        ctx.data.eval,
        cfg.model.layer,
        norm_factor,
        ctx.data.specials,
        cfg.data.llm_batch_size,
    )
    ctx.set_stage("attribute", cycle=cycle)
    pooled = attribute(
        ctx.model,
        sae,
        ctx.data.attribution,
        cfg.model.layer,
        norm_factor,
        ctx.data.specials,
        cfg.attribution,
        log=None,
    )
    sel = select_core(sae, pooled, cfg.distill.tau, cfg.distill.core_mode, cfg.distill.max_core)
    summary = {
        "cycle": cycle,
        "core_in": len(core_ids),
        "core_size": len(sel.ids),
        "jaccard": jaccard(sel.ids, core_ids) if cycle > 0 else None,
        "fraction": sel.fraction,
        "train": train_metrics,
        "eval": metrics,
    }
    core_out = {
        "cycle": cycle,
        "indices": sel.indices,
        "ids": [list(i) for i in sel.ids],
        "scores": sel.scores,
        "fraction": sel.fraction,
        "tau": cfg.distill.tau,
        "candidate_ids": [
            list(map(int, p))
            for p in zip(
                sae.origin_cycle[: sae.nested_width].tolist(),
                sae.origin_index[: sae.nested_width].tolist(),
                strict=True,
            )
        ],
        "candidate_scores": sel.candidate_scores,
    }
    ctx.rd.save_cycle(
        cycle, sae, cfg, norm_factor, core_ids, core_out, core_vectors(sae, sel.indices), summary
    )
    return summary


def format_summary(s: dict) -> str:
    jac = "-" if s["jaccard"] is None else f"{s['jaccard']:.3f}"
    ev = s["eval"]
    return (
        f"[cycle {s['cycle']}] core {s['core_in']} -> {s['core_size']} "
        f"(attribution {s['fraction']:.3f}), jaccard {jac}, L0 {ev['l0']:.1f} "
        f"(core {ev['core_l0']:.1f}), FVE {ev['explained_variance']:.3f}, "
        f"CE recovered {ev['ce_loss_score']:.3f}"
    )


def finish(ctx: Context) -> None:
    """The distilled core: the last cycle's selection, with counts and origins over cycles."""
    n = len(ctx.state["cycles"])
    history = [[tuple(i) for i in ctx.rd.load_core(c)["ids"]] for c in range(n)]
    counts = selection_counts(history)
    last = ctx.rd.load_core(n - 1)
    vectors = ctx.rd.load_core_encoder(n - 1)
    ctx.rd.save_distilled_core(
        vectors,
        {
            "ids": last["ids"],
            "scores": last["scores"],
            "selection_counts": [counts[tuple(i)] for i in last["ids"]],
            "origin_cycle": [i[0] for i in last["ids"]],
            "core_size_per_cycle": [len(h) for h in history],
            "jaccard_per_cycle": [s["jaccard"] for s in ctx.state["cycles"]],
            "history": [[list(i) for i in h] for h in history],
        },
    )


def run(cfg: RunConfig, log: Log = print) -> dict:
    """Run (or resume) a distillation; returns the final state."""
    preflight(cfg)
    rd = RunDir(cfg.run_dir)
    state = rd.load_state()
    if state["status"] == "completed":
        rd.init(cfg)  # still refuses a changed config
        log(f"{rd.root}: already completed ({len(state['cycles'])} cycles)")
        return state
    torch.manual_seed(cfg.train.seed)
    log(f"loading {cfg.model.name} and {cfg.data.dataset}")
    model = load_lm(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    data = load_token_data(cfg.data, tokenizer)
    # Only now, with model and data known to load, does the run directory come into being.
    cfg = rd.init(cfg)
    state["d_in"] = int(model.config.hidden_size)
    ctx = Context(cfg, rd, model, data, state, log)
    if state["cycle"]:
        log(f"resuming {rd.root} after cycle {state['cycle'] - 1}")
    state["status"], state["error"] = "running", None
    rd.save_state(state)
    try:
        for cycle in range(state["cycle"], cfg.distill.cycles + 1):
            t0 = time.time()
            summary = run_cycle(ctx, cycle)
            summary["seconds"] = time.time() - t0
            state["cycles"].append(summary)
            state["cycle"] = cycle + 1
            ctx.set_stage("committed", cycle=cycle)
            log(format_summary(summary))
        finish(ctx)
        state["status"], state["stage"] = "completed", None
    except KeyboardInterrupt:
        state["status"] = "stopped"
        raise
    except Exception as err:
        state["status"], state["error"] = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        rd.save_state(state)
    log(f"distilled core: {state['cycles'][-1]['core_size']} latents -> {rd.core_dir}")
    return state
