"""One finished tiny distillation shared by the evaluation, report, export and transfer tests.

It lives under the session's base temp dir, so the first module that asks trains it (a few
seconds) and every later one gets it back at once: ``pipeline.run`` returns immediately on a
completed run directory with the same config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config

from dmsae_ray.config import validate
from dmsae_ray.run import pipeline


def finished_core_run(tiny_dir: dict[str, Path], factory: pytest.TempPathFactory) -> Path:
    run_dir = factory.getbasetemp() / "dmsae-shared-core-run"
    cfg = validate(tiny_config(tiny_dir, run_dir, distill={"cycles": 2}))
    state = pipeline.run(cfg, log=lambda s: None)
    assert state["status"] == "completed"
    return run_dir
