"""Sweeps, the execution: each trial of a ``sweep_plan.SweepPlan`` is a Ray Tune function
trainable that runs the ordinary pipeline (``pipeline.run``) in its own run directory, reports
every committed cycle to Tune, and resumes after its last committed cycle; a rerun launches
only the trials that are not complete and restores Tune's experiment when the unfinished set is
the same. Ray is imported inside the functions that need it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmsae_ray.jsonio import atomic_write_json, read_json_or_none
from dmsae_ray.run.sweep_plan import STATE_FILE, SWEEP_FILE, Log, SweepPlan, Trial, digest
from dmsae_ray.run.sweep_summary import (
    cycle_metrics,
    selected_every_cycle,
    summarize,
    trial_done,
    write_summary,
)

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
    from dmsae_ray.run.pipeline import run

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
    core = read_json_or_none(Path(cfg_json["run_dir"]) / "core" / "core.json")
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
    name = "tune-" + digest(sorted(t.name for t in pending))[:10]
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
    state = read_json_or_none(sweep_dir / STATE_FILE) or {}
    state |= fields | {"updated": time.time()}
    atomic_write_json(sweep_dir / STATE_FILE, state)
    return state


def report(plan: SweepPlan, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Summary table and plots of the sweep as its run directories stand now."""
    from dmsae_ray.tools.report import write_sweep_plots

    summary = summarize(plan.as_dict(), errors)
    write_summary(plan.sweep_dir, summary)
    write_sweep_plots(plan.sweep_dir, summary)
    return summary


def run_sweep(plan: SweepPlan, log: Log = print) -> SweepOutcome:
    """Run (or resume) a sweep: launch the trials whose run directory is not complete as Ray
    Tune trials, then write the summary and plots. Connects to Ray (``plan.base.ray``: an
    address, $RAY_ADDRESS or a local cluster) unless already connected."""
    sweep_dir = plan.sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / SWEEP_FILE, plan.as_dict())
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
            from dmsae_ray.distributed.ray_utils import connect

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


