"""``dmsae`` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmsae_ray.config import ConfigError, RunConfig, load_config
from dmsae_ray.tools.compare import DEFAULT_SEEDS

if TYPE_CHECKING:
    from dmsae_ray.run.sweep_plan import SweepPlan

DESCRIPTION = """\
dmsae-ray: Distilled Matryoshka Sparse Autoencoders.

A distillation repeats a cycle: train a Matryoshka BatchTopK SAE whose innermost block is a
frozen core, score the latents of its most nested reconstruction by gradient x activation on
next-token loss, keep the smallest set explaining a fraction tau of the attribution, and carry
only those latents' encoder vectors into the next cycle.

subcommands:
  run      run or resume a distillation (no arguments: the embedded default, stories15M)
  status   show the state of a run directory (--address: live, from its coordinator actor)
  config   print the effective config (embedded default, or a file plus overrides)
  serve    the REST service: submit, watch, stop distillations as Ray jobs
  sweep    one distillation per grid point (e.g. tau x k) as Ray Tune trials, with a summary
  transfer final SAEs with the distilled core vs a plain Matryoshka and a random core, per k
  report   summary.md + plots of a run (core sizes, origins, Jaccard; transfer curves)
  export   a run's SAEs as SAELens folders (--hub-layout: ready to push to the HF hub)
  inspect  top-activating token contexts of (core) latents
  study    the paper's experiment in one command: distil, transfer over a k grid, report
"""

STUDY_HELP = """\
The paper's experiment, resumable, in one directory OUT:
  OUT/distill    the distillation: cycle 0 plus distill.cycles (the paper: 7)
  OUT/transfer   for every --k: a plain Matryoshka baseline, a random core (a random subset of
                 the cycle-0 SAE's most nested latents, of the distilled core's size) and the
                 distilled core, --seeds seeds each; transfer.md compares them at the same
                 *measured* L0 (mean, standard error, verdict per metric)
  OUT/report     summary.md and PNGs: core size and Jaccard per cycle, the final core's origin
                 cycles, selection counts and densities, metric vs measured L0 curves
  OUT/activations  the training activations, computed once and shared by every run
  OUT/study.json the command, versions and machine
Rerunning the same command continues where it stopped; a finished study only rebuilds the
report. Example (the committed stories15M study, results/stories15m/):
  dmsae study configs/study/stories15m.yaml --out runs/study-stories15m --k 16,32,64,128
"""

RUN_EPILOG = """\
Configuration: --config FILE (YAML or JSON, sections model/data/sae/train/attribution/distill/ray,
paper defaults for every key it leaves out) and any number of --set section.key=value.
Without --config the embedded default is used (stories15M, its own sampled corpus).
Examples:
  dmsae run                                    # embedded default, runs/embedded
  dmsae run --set distill.cycles=5 --set distill.tau=0.8
  dmsae run --config configs/gemma-2-2b.yaml   # the paper's reference run
A rerun with the same run_dir resumes after the last committed cycle.
"""


def _add_config_args(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    """--config and --set, as `dmsae run` and `dmsae sweep` (its base config) take them."""
    p.add_argument("--config", "-c", help="YAML/JSON config (paper defaults for missing keys)")
    p.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set sae.k=64 (repeatable)",
    )
    if run_dir:
        p.add_argument("--run-dir", help="shortcut for --set run_dir=...")


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    base = RunConfig() if args.config else None
    return load_config(args.config, overrides, base=base)


def cmd_run(args: argparse.Namespace) -> int:
    from dmsae_ray.run.pipeline import run

    cfg = _config(args)
    # `ray job stop` sends SIGTERM: end like Ctrl-C so the state says "stopped", not "running".
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        state = run(cfg)
    except KeyboardInterrupt:
        print("stopped; run the same command again to resume", file=sys.stderr)
        return 130
    return 0 if state["status"] == "completed" else 1


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).model_dump(mode="json"), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    # Torch-free (runfiles, heartbeat): the status of a run answers in a fraction of a second.
    from dmsae_ray.run import runfiles
    from dmsae_ray.run.heartbeat import driver_liveness

    root = Path(args.run_dir).expanduser()
    if not (root / runfiles.CONFIG_FILE).is_file():
        print(f"error: {root} is not a run directory (no config.json)", file=sys.stderr)
        return 2
    if args.address:
        state = _live_state(root, args.address)
    else:
        state = runfiles.read_state(root) or runfiles.new_state()
    # state.json cannot record a SIGKILL: ask the heartbeat whether "running" is still true.
    live = driver_liveness(root, state)
    dead = live is not None and not live.alive
    if args.json:
        if live is not None:
            state = state | {"driver": {"alive": live.alive, "reason": live.reason,
                                        "heartbeat_age_s": live.age_s}}
        print(json.dumps(state, indent=2))
        return 0
    status = "dead (state.json says running)" if dead else state["status"]
    print(f"{root}: {status}, cycle {state['cycle']}, stage {state['stage']}")
    if dead:
        assert live is not None
        print(f"  {live.reason}; run the same command again (or POST .../resume) to resume "
              "after the last committed cycle")
    progress = state.get("progress") or {}
    if not dead and "tokens_done" in progress and "tokens_total" in progress:
        eta = progress.get("eta_s")
        print(
            f"  {progress['tokens_done']}/{progress['tokens_total']} tokens"
            + (f", ETA {eta:.0f} s" if eta is not None else "")
        )
    if state.get("error"):
        print(f"  error: {state['error']}")
    for s in runfiles.read_cycles(state):
        jac = "-" if s.jaccard is None else f"{s.jaccard:.3f}"
        ev = s.eval
        print(
            f"  cycle {s.cycle}: core {s.core_in} -> {s.core_size}, jaccard {jac}, "
            f"L0 {ev['l0']:.1f}, FVE {ev['fve']:.3f}"
        )
    return 0


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


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """`dmsae sweep` options: the base config as `dmsae run` takes it (its config may hold a
    sweep: section), then the search space."""
    _add_config_args(p, run_dir=False)
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


def sweep_plan_from_args(args: argparse.Namespace) -> SweepPlan:
    from dmsae_ray.run.sweep_plan import load_sweep, parse_values

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


def cmd_sweep(args: argparse.Namespace) -> int:
    from dmsae_ray.distributed.tuning import run_sweep
    from dmsae_ray.run.sweep_plan import SUMMARY_CSV, SUMMARY_MD
    from dmsae_ray.run.sweep_summary import trial_done

    plan = sweep_plan_from_args(args)
    if args.dry_run:
        print(f"sweep {plan.name} -> {plan.sweep_dir}: {len(plan.trials)} trials")
        for t in plan.trials:
            state = "complete" if trial_done(t.run_dir) else "to run"
            print(f"  {t.name}  {json.dumps(t.params)}  ({state})")
        return 0
    # As for `dmsae run`: `ray job stop` ends the sweep as "stopped"; rerunning resumes it.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        outcome = run_sweep(plan)
    except KeyboardInterrupt:
        print("stopped; run the same command again to resume", file=sys.stderr)
        return 130
    print((plan.sweep_dir / SUMMARY_MD).read_text())
    print(f"summary: {plan.sweep_dir / SUMMARY_CSV}; plots: {plan.sweep_dir / 'plots'}")
    return 0 if outcome.ok else 130 if outcome.interrupted else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from api.server import serve

    return serve(
        host=args.host, port=args.port, ray_address=args.ray_address, runs_root=args.runs_root,
        token_file=args.token_file, max_active_runs=args.max_active_runs,
        max_active_sweeps=args.max_active_sweeps, model_roots=args.model_root,
        data_roots=args.data_root, cache_roots=args.cache_root, serve_tokens=args.serve_tokens,
        allowed_hosts=args.allowed_host,
    )


def _live_state(root: Path, address: str) -> dict:
    """Ask the run's coordinator actor (fresh progress while a cycle runs); fall back to the
    state file when the run has no live coordinator."""
    import ray

    from dmsae_ray.distributed.coordinator import get_coordinator
    from dmsae_ray.run import runfiles

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return ray.get(get_coordinator(root, create=False).get.remote(), timeout=30)
    except ValueError:  # no such actor: the run is not active
        return runfiles.read_state(root) or runfiles.new_state()
    finally:
        ray.shutdown()


def cmd_transfer(args: argparse.Namespace) -> int:
    from dmsae_ray.tools.transfer import parse_ks, run_transfer, summarize

    rows = run_transfer(
        args.core, parse_ks(args.k), out=args.out, config=args.config, overrides=args.set,
        variants=tuple(v for v in args.variants.split(",") if v), seeds=args.seeds,
        seed=args.seed,
    )
    print(summarize(rows))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from dmsae_ray.tools.study import run_study
    from dmsae_ray.tools.transfer import parse_ks

    run_study(args.config, args.out, parse_ks(args.k), seeds=args.seeds, overrides=args.set)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dmsae_ray.tools.report import build_report

    files = build_report(args.run_dir, transfer=args.transfer, out=args.out)
    print(f"{files['summary']} ({len(files) - 1} plots)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dmsae_ray.tools.export import export_run

    export_run(
        args.run_dir, args.out, cycle=args.cycle, hub_layout=args.hub_layout,
        sparsity=not args.no_sparsity, repo_id=args.repo_id,
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dmsae_ray.tools.inspect_latents import format_latents, inspect_latents

    latents = [s for spec in args.latent for s in spec.split(",") if s] or None
    results = inspect_latents(
        args.run_dir, latents, cycle=args.cycle, top=args.top, window=args.window,
        source=args.source,
    )
    print(json.dumps(results, indent=2) if args.json else format_latents(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmsae", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "run", help="run or resume a distillation", description=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("status", help="state of a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw state.json")
    p.add_argument(
        "--address", help="Ray cluster (e.g. auto): ask the run's live coordinator actor"
    )
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("config", help="print the effective config")
    _add_config_args(p)
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("serve", help="REST service: runs as Ray jobs (docs/api.md)")
    p.add_argument("--host", default="127.0.0.1", help="without a token: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ray-address", help="Ray dashboard URL (default: $RAY_ADDRESS)")
    p.add_argument("--runs-root", default="runs/api", help="run dirs; runs DB next to it")
    p.add_argument("--token-file", help="bearer token file (default: $DMSAE_API_TOKEN)")
    p.add_argument("--max-active-runs", type=int, default=4, help="429 beyond this")
    p.add_argument("--max-active-sweeps", type=int, default=2, help="429 beyond this")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="model.name may be a path under DIR (repeatable; default: hub ids and "
                   "built-in models only)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="data.dataset may be a path under DIR (repeatable)")
    p.add_argument("--cache-root", action="append", default=[], metavar="DIR_OR_URI",
                   help="data.activation_cache may be under this directory or URI prefix "
                   "(repeatable; default: none)")
    p.add_argument("--serve-tokens", action="store_true",
                   help="serve runs' tokens/ (the tokenised corpus) as artifacts")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="without a token: a Host header accepted besides localhost, "
                   "127.0.0.1 and [::1] (repeatable)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser(
        "sweep", help="sweep tau, k, ... as Ray Tune trials", description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sweep_arguments(p)
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("transfer", help="distilled core vs baseline vs random core, per k")
    p.add_argument("--core", required=True, type=Path, help="run dir holding the distilled core")
    p.add_argument("--k", default="20,40,80,160,320,640", help="comma-separated k values")
    p.add_argument("--config", "-c", help="config of the final SAEs (default: the core run's)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of that config (repeatable)")
    p.add_argument("--out", type=Path, help="runs and tables (default: CORE/transfer)")
    p.add_argument("--variants", default="distilled,baseline,random", help="which rows to train")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help="seeds per (k, variant): mean and standard error per point "
                   f"(default {DEFAULT_SEEDS})")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed (train.seed and random-core draw); then seed+1, ...")
    p.set_defaults(fn=cmd_transfer)
    p = sub.add_parser(
        "study", help="distil, transfer over a k grid with seeds, report: one resumable command",
        description=STUDY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="run config (default: the embedded default)")
    p.add_argument("--out", required=True, type=Path, help="the study directory")
    p.add_argument("--k", default="16,32,64,128", help="comma-separated k values of the transfer")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds per (k, variant)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the config (repeatable)")
    p.set_defaults(fn=cmd_study)
    p = sub.add_parser("report", help="summary.md + plots of a run (RUN_DIR/report/)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--transfer", type=Path, help="transfer.csv (default: RUN_DIR/transfer/)")
    p.add_argument("--out", type=Path, help="default: RUN_DIR/report")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("export", help="SAELens folders of a run's SAEs")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--cycle", default="final", help="a cycle number, final (default) or all")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--hub-layout", action="store_true", help="one folder per SAE id + README")
    p.add_argument("--repo-id", help="HF repo id for the model card's loading example")
    p.add_argument("--no-sparsity", action="store_true",
                   help="skip the eval pass that writes sparsity.safetensors (no LM needed)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("inspect", help="top-activating contexts of latents")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--latent", action="append", default=[],
                   help="index or persistent id cycle:index, comma-separated or repeated "
                   "(default: the core selected from the cycle)")
    p.add_argument("--cycle", default="final", help="a cycle number or final (default)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--window", type=int, default=8, help="tokens of context on each side")
    p.add_argument("--source", default="heldout", choices=["heldout", "eval", "attribution"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        # Bad input: one clear line, no traceback; nothing of the run directory is lost.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
