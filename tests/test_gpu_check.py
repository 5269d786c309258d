"""``bench/gpu_check.sh --dry-run``: the GPU check runs end to end on the CPU, so the script
that a lent GPU gets only minutes for is known to work before the machine is there."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = {
    "tests",
    "sae_step",
    "sae_step_fp32",
    "activations",
    "run_config",
    "run_inprocess",
    "run_gemma3",
}


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_dry_run_passes_every_step_and_records_real_numbers(tmp_path):
    out = tmp_path / "gpu" / "results.json"
    # The child sets DMSAE_TEST_DEVICE itself; an inherited one must not leak in.
    env = {k: v for k, v in os.environ.items() if k != "DMSAE_TEST_DEVICE"}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "# gpu_check (dry-run): passed" in proc.stdout
    results = json.loads(out.read_text())
    assert out.with_name("results.steps.log").stat().st_size > 0
    assert results["mode"] == "dry-run" and results["status"] == "passed"
    assert results["environment"]["packages"]["torch"]
    steps = results["steps"]
    assert set(steps) == STEPS
    for name, rec in steps.items():
        assert rec["status"] in ("passed", "skipped"), (name, rec)
        assert rec["status"] == "passed" or rec["reason"], name

    tests = steps["tests"]["data"]
    assert tests["passed"] == tests["tests"] >= 10 and not tests["failed"]

    impls = ["fast", "eager"]
    if results["environment"]["packages"]["sae_lens"]:
        impls.append("saelens")
    for name in ("sae_step", "sae_step_fp32"):
        (row,) = steps[name]["data"]
        assert row["precision"] == ("bf16" if name == "sae_step" else "fp32")
        for impl in impls if name == "sae_step" else ["fast", "eager"]:
            r = row[impl]
            assert not r["errors"], (name, impl, r["errors"])
            for key in ("step_s", "tokens_per_s", "flops", "tflops", "frac_peak"):
                assert positive(r[key]), (name, impl, key, r[key])

    models = steps["activations"]["data"]["models"]
    assert any("Gemma-2" in m["model"] for m in models)
    for m in models:
        assert m["max_abs_diff"] == 0  # stopping after the layer changes no value
        assert all(positive(v) for v in m["tokens_per_s"].values()) and m["tokens"] > 0
        assert positive(m["stop_after_layer_speedup"])

    cfg = steps["run_config"]["data"]
    assert cfg["validated"] and cfg["ray"]["use_gpu"] and cfg["ray"]["enabled"]
    assert cfg["model"]["dtype"] == "auto" and cfg["distill"]["cycles"] == 1

    run = steps["run_inprocess"]["data"]
    assert run["status"] == "completed" and not run["config"]["ray"]["enabled"]
    assert [c["cycle"] for c in run["cycles"]] == [0, 1]
    assert all(c["core_size"] > 0 and 0 < c["l0"] for c in run["cycles"])
    assert run["cycles"][1]["core_in"] == run["cycles"][0]["core_size"]

    gemma3 = [REPO / "configs" / n for n in ("gemma3-270m.yaml", "gemma-3-270m.yaml")]
    if any(f.is_file() for f in gemma3):  # validated with the GPU run's overrides
        g3 = steps["run_gemma3"]["data"]
        assert g3["validated"] and g3["ray"]["use_gpu"] and g3["model"]["dtype"] == "auto"
    else:
        assert steps["run_gemma3"]["status"] == "skipped"
