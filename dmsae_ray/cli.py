"""``dmsae`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmsae_ray.config import ConfigError, RunConfig, load_config

DESCRIPTION = """\
dmsae-ray: Distilled Matryoshka Sparse Autoencoders.

A distillation repeats a cycle: train a Matryoshka BatchTopK SAE whose innermost block is a
frozen core, score the latents of its most nested reconstruction by gradient x activation on
next-token loss, keep the smallest set explaining a fraction tau of the attribution, and carry
only those latents' encoder vectors into the next cycle.

subcommands:
  run      run or resume a distillation (no arguments: the embedded default, stories15M)
  status   show the state of a run directory
  config   print the effective config (embedded default, or a file plus overrides)
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


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML/JSON config (paper defaults for missing keys)")
    p.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set sae.k=64 (repeatable)",
    )
    p.add_argument("--run-dir", help="shortcut for --set run_dir=...")


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    base = RunConfig() if args.config else None
    return load_config(args.config, overrides, base=base)


def cmd_run(args: argparse.Namespace) -> int:
    from dmsae_ray.pipeline import run

    cfg = _config(args)
    state = run(cfg)
    return 0 if state["status"] == "completed" else 1


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).model_dump(mode="json"), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dmsae_ray.rundir import RunDir

    rd = RunDir(args.run_dir)
    if not rd.config_path.is_file():
        print(f"error: {rd.root} is not a run directory (no config.json)", file=sys.stderr)
        return 2
    state = rd.load_state()
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"{rd.root}: {state['status']}, cycle {state['cycle']}, stage {state['stage']}")
    if state.get("error"):
        print(f"  error: {state['error']}")
    for s in state["cycles"]:
        jac = "-" if s["jaccard"] is None else f"{s['jaccard']:.3f}"
        ev = s["eval"]
        print(
            f"  cycle {s['cycle']}: core {s['core_in']} -> {s['core_size']}, jaccard {jac}, "
            f"L0 {ev['l0']:.1f}, FVE {ev['explained_variance']:.3f}"
        )
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
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("config", help="print the effective config")
    _add_config_args(p)
    p.set_defaults(fn=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback; nothing of the run directory is lost.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
