"""The base config of the sweep tests (test_sweep_plan.py plans it, test_tuning.py runs it on
Ray Tune): the tiny model, one cycle unless a section says otherwise, and a run directory the
sweep replaces with its trials' own."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_config


def base_config(tiny_dir, tmp: Path, **sections) -> dict:
    sections = {"distill": {"cycles": 1}} | sections
    return tiny_config(tiny_dir, tmp / "unused-run-dir", **sections)
