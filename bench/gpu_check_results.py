"""The results file of ``bench/gpu_check.sh``: one JSON, rewritten after every step.

Rewriting it after each step means a run cut short (the device lease ends, a step hangs past
the script's own deadline) still leaves every finished step's record behind.

    python bench/gpu_check_results.py init OUT --mode gpu|dry-run
    python bench/gpu_check_results.py step OUT NAME STATUS SECONDS [--kind K] [--data PATH]
        [--log LOG] [--reason TEXT]
    python bench/gpu_check_results.py finish OUT       # prints the summary, exit 1 on a failure

A step's ``status`` is ``passed``, ``failed``, ``timeout`` or ``skipped`` (with a ``reason``);
``data`` holds what its ``--kind`` parser read from ``--data`` (pytest's JUnit XML, a run
directory, a benchmark's JSON, a printed config).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

STATUSES = ("passed", "failed", "timeout", "skipped")
LOG_TAIL = 4000  # characters of a step's log kept in the file: enough for a traceback
PACKAGES = ("torch", "pydantic", "ray", "transformers", "sae_lens", "pytest", "pyarrow", "yaml")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def save(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(results), indent=1) + "\n")
    tmp.replace(path)


def finite(value: Any) -> Any:
    """NaN and inf as null: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def package_versions() -> dict[str, str | None]:
    """Each package's version, None where it is not installed (the device image lacks some)."""
    from importlib.metadata import PackageNotFoundError, version

    dist = {"yaml": "pyyaml", "sae_lens": "sae-lens"}
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        if importlib.util.find_spec(name) is None:
            out[name] = None
            continue
        try:
            out[name] = version(dist.get(name, name))
        except PackageNotFoundError:
            out[name] = "installed (no metadata)"
    return out


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "cuda_available": False,
    }
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = props.name
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["gpu_sms"] = props.multi_processor_count
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return env


# -- what each kind of step leaves behind ---------------------------------------------------
def parse_tests(path: Path) -> dict[str, Any]:
    """pytest's JUnit XML: counts and the failing tests with their messages."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[dict[str, str]] = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for tag in ("failure", "error"):
                bad = case.find(tag)
                if bad is not None:
                    name = f"{case.get('classname')}::{case.get('name')}"
                    failed.append({"test": name, "message": (bad.get("message") or "")[:500]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts | {"failed": failed}


def parse_run_dir(path: Path) -> dict[str, Any]:
    """A ``dmsae run`` directory: its state and, per committed cycle, the core and metrics."""
    state_path = path / "state.json"
    if not state_path.is_file():
        return {"run_dir": str(path), "state": None}
    state = json.loads(state_path.read_text())
    cycles = []
    for s in state.get("cycles", []):
        ev = s.get("eval") or {}
        cycles.append(
            {
                "cycle": s.get("cycle"),
                "core_in": s.get("core_in"),
                "core_size": s.get("core_size"),
                "jaccard": s.get("jaccard"),
                "l0": ev.get("l0"),
                "explained_variance": ev.get("explained_variance"),
                "ce_loss_score": ev.get("ce_loss_score"),
            }
        )
    out: dict[str, Any] = {
        "run_dir": str(path),
        "status": state.get("status"),
        "error": state.get("error"),
        "cycles": cycles,
    }
    cfg_path = path / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        out["config"] = {
            "model": cfg["model"]["name"],
            "dtype": cfg["model"]["dtype"],
            "ray": cfg["ray"],
            "tokens_per_cycle": cfg["train"]["tokens_per_cycle"],
            "width": cfg["sae"]["width"],
            "k": cfg["sae"]["k"],
        }
    return out


def parse_config(path: Path) -> dict[str, Any]:
    """``dmsae config`` output: the fields the GPU run depends on, as validated."""
    cfg = json.loads(path.read_text())
    return {
        "validated": True,
        "model": cfg["model"],
        "ray": cfg["ray"],
        "train": {k: cfg["train"][k] for k in ("tokens_per_cycle", "batch_size", "fast_path")},
        "distill": {"cycles": cfg["distill"]["cycles"]},
    }


def parse_json(path: Path) -> Any:
    return json.loads(path.read_text())


PARSERS = {
    "tests": parse_tests,
    "run": parse_run_dir,
    "config": parse_config,
    "json": parse_json,
}


def problem(kind: str, data: Any) -> str | None:
    """Why a step whose command exited 0 still failed: a benchmark run that errored inside
    (``sae_step.py`` reports it and goes on), a run that did not complete."""
    if kind == "run" and data.get("status") != "completed":
        return f"the run ended {data.get('status')!r}: {data.get('error')}"
    if kind == "json" and isinstance(data, list):  # sae_step rows
        for row in data:
            for impl in ("fast", "eager", "saelens"):
                r = row.get(impl)
                if r and (r.get("errors") or r.get("step_s") is None):
                    shape = f"width {row['width']} batch {row['batch']}"
                    return f"{impl} at {shape}: {(r.get('errors') or ['no timing'])[0]}"
    if kind == "tests" and data["failures"] + data["errors"]:
        return f"{data['failures'] + data['errors']} of {data['tests']} tests failed"
    if kind == "tests" and not data["passed"]:
        return "no test ran"
    return None


def tail(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    text = path.read_text(errors="replace")
    return text[-LOG_TAIL:]


# -- commands --------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    results = {
        "mode": args.mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": args.command_line,
        "environment": environment(),
        "steps": {},
    }
    save(args.out, results)
    env = results["environment"]
    gpu = env.get("gpu") or "no CUDA device"
    print(f"python {env['python']}, torch {env['packages']['torch']}, {gpu}")
    missing = [name for name, v in env["packages"].items() if v is None]
    if missing:
        print(f"not installed here: {', '.join(missing)}")
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    results = load(args.out)
    record: dict[str, Any] = {"status": args.status, "seconds": round(args.seconds, 1)}
    if args.reason:
        record["reason"] = args.reason
    if args.data is not None and args.kind:
        try:
            record["data"] = PARSERS[args.kind](args.data)
        except (OSError, ValueError, KeyError, ET.ParseError) as err:
            # What the step left is unreadable: keep the step's own status, say why.
            record["data_error"] = f"{type(err).__name__}: {err}"
            if args.status == "passed":
                record["status"], record["reason"] = "failed", "its results are unreadable"
        else:
            why = problem(args.kind, record["data"])
            if why and args.status == "passed":
                record["status"], record["reason"] = "failed", why
    if record["status"] != "passed" and (log := tail(args.log)):
        record["log_tail"] = log
    results["steps"][args.name] = record
    save(args.out, results)
    why = f": {record['reason']}" if "reason" in record else ""
    print(f"-- {args.name}: {record['status']} ({record['seconds']} s){why}"[:300])
    return 0


def headline(name: str, record: dict[str, Any]) -> str:
    """One line of numbers per step, for the summary printed at the end."""
    data = record.get("data")
    if not isinstance(data, (dict, list)):
        return record.get("reason", "")
    if isinstance(data, dict) and "tests" in data:
        return (
            f"{data['passed']} passed, {data['failures'] + data['errors']} failed, "
            f"{data['skipped']} skipped"
        )
    if isinstance(data, dict) and "cycles" in data:
        cores = " -> ".join(str(c["core_size"]) for c in data["cycles"])
        model = data.get("config", {}).get("model", "?")
        return f"{model}: {data.get('status')}, cores {cores or '-'}"
    if isinstance(data, dict) and data.get("validated"):
        return f"config valid (ray.use_gpu={data['ray']['use_gpu']})"
    if isinstance(data, list):  # sae_step rows
        parts = []
        for row in data:
            cells = []
            for impl in ("fast", "eager", "saelens"):
                r = row.get(impl)
                if r and r.get("step_s") is not None:
                    tf = r.get("tflops")
                    cells.append(
                        f"{impl} {r['step_s'] * 1e3:.1f} ms"
                        + (f" {tf:.3g} TFLOP/s" if tf is not None else "")
                    )
            parts.append(f"K={row['width']} B={row['batch']}: " + ", ".join(cells))
        return "; ".join(parts)
    if isinstance(data, dict) and "models" in data:
        parts = []
        for m in data["models"]:
            rate = m["tokens_per_s"].get("stop after layer (hook)")
            parts.append(
                f"{m['model']}: {rate:,.0f} tok/s stop-after-layer "
                f"({m['stop_after_layer_speedup']:.2f}x full)"
            )
        return "; ".join(parts)
    return ""


def cmd_finish(args: argparse.Namespace) -> int:
    results = load(args.out)
    steps = results["steps"]
    failed = [n for n, r in steps.items() if r["status"] in ("failed", "timeout")]
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["status"] = "failed" if failed else "passed"
    save(args.out, results)
    print(f"\n# gpu_check ({results['mode']}): {results['status']}")
    print("| step | status | seconds | result |")
    print("|---|---|---|---|")
    for name, r in steps.items():
        text = headline(name, r)
        if r["status"] != "passed":
            # Why it did not pass beats partial numbers: the reason, else the log's last line.
            lines = [ln for ln in (r.get("log_tail") or "").splitlines() if ln.strip()]
            text = r.get("reason") or (lines[-1].strip() if lines else text)
        text = text[:300].replace("|", "/")  # a pipe would split the markdown cell
        print(f"| {name} | {r['status']} | {r['seconds']} | {text} |")
    print(f"\nresults: {args.out}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    p.add_argument("--command-line", default="")
    p.set_defaults(fn=cmd_init)
    p = sub.add_parser("step")
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p.add_argument("status", choices=STATUSES)
    p.add_argument("seconds", type=float)
    p.add_argument("--kind", choices=sorted(PARSERS))
    p.add_argument("--data", type=Path)
    p.add_argument("--log", type=Path)
    p.add_argument("--reason")
    p.set_defaults(fn=cmd_step)
    p = sub.add_parser("finish")
    p.add_argument("out", type=Path)
    p.set_defaults(fn=cmd_finish)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
