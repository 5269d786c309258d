"""The run directory, the unit of persistence (docs/run-directory.md).

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written artefact and a restart resumes after the last committed cycle.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dmsae_ray.algo.core import Core
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.algo.sae_files import load_sae, save_sae
from dmsae_ray.config import ConfigError, MissingInputError, RunConfig, save_config, validate
from dmsae_ray.jsonio import atomic_directory, atomic_write_json, read_json
from dmsae_ray.run.runfiles import CONFIG_FILE, STATE_FILE, cycle_dir, new_state
from dmsae_ray.run.saelens import write_saelens


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # paths
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def cycle_dir(self, cycle: int) -> Path:
        return cycle_dir(self.root, cycle)

    @property
    def core_dir(self) -> Path:
        return self.root / "core"

    # config and state
    def init(self, cfg: RunConfig) -> RunConfig:
        """Write the config on a new run; on an existing one the stored config wins, so a
        resumed run cannot silently change its hyperparameters halfway."""
        if self.config_path.is_file():
            stored = validate(read_json(self.config_path))
            # Where a run executes (the ray section) may change between resumes; what it
            # computes may not.
            a, b = _what(stored), _what(cfg)
            if a != b:
                diff = _diff(a, b)
                raise ConfigError(
                    f"{self.root} already holds a run with a different config ({diff}); "
                    "use another run_dir or the same config to resume"
                )
            if stored.ray != cfg.ray:
                save_config(cfg, self.config_path)
            return cfg
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_path)
        return cfg

    def load_state(self) -> dict:
        return read_json(self.state_path) if self.state_path.is_file() else new_state()

    def save_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state)

    # per-cycle artefacts
    def save_cycle(
        self,
        cycle: int,
        sae: MatryoshkaBatchTopKSAE,
        cfg: RunConfig,
        norm_factor: float,
        core_in: list,
        core_out: dict,
        core: Core,
        metrics: dict,
    ) -> None:
        """Write the whole cycle into a temp dir and rename it into place (all or nothing)."""
        # A failed or interrupted write (disk full, a stop's KeyboardInterrupt) leaves neither
        # the cycle nor a hidden copy of its SAE behind.
        with atomic_directory(self.cycle_dir(cycle)) as tmp:
            sae_dir = tmp / "sae"
            # Our own full state (buffers, latent ids, normalised scale) for resume and
            # transfer, first: save_sae writes its directory as a whole, SAELens files beside.
            save_sae(sae_dir, sae, metrics)
            write_saelens(sae_dir, sae, cfg, cycle, core_in, norm_factor)
            atomic_write_json(tmp / "core.json", core_out)
            _save_core_tensors(tmp / "core_encoder.safetensors", core)

    def load_sae(self, cycle: int) -> MatryoshkaBatchTopKSAE:
        return load_sae(self.cycle_dir(cycle) / "sae")[0]

    def load_core(self, cycle: int) -> dict:
        return read_json(self.cycle_dir(cycle) / "core.json")

    def load_core_encoder(self, cycle: int) -> torch.Tensor:
        return self.load_cycle_core(cycle).vectors

    def load_cycle_core(self, cycle: int) -> Core:
        """The core cycle ``cycle`` selected, as the next cycle receives it."""
        ids = self.load_core(cycle)["ids"]
        return _load_core_tensors(self.cycle_dir(cycle) / "core_encoder.safetensors", ids)

    def save_distilled_core(self, core: Core, summary: dict) -> None:
        self.core_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.core_dir / ".encoder.safetensors.tmp"
        _save_core_tensors(tmp, core)
        os.replace(tmp, self.core_dir / "encoder.safetensors")
        atomic_write_json(self.core_dir / "core.json", summary)

    def load_distilled_core(self) -> tuple[Core, dict]:
        path = self.core_dir / "encoder.safetensors"
        if not path.is_file():
            raise MissingInputError(f"{self.root} has no distilled core yet ({path})")
        summary = read_json(self.core_dir / "core.json")
        return _load_core_tensors(path, summary["ids"]), summary


def _save_core_tensors(path: Path, core: Core) -> None:
    tensors = {"W_enc_core": core.vectors.contiguous(), "b_enc_core": core.bias.contiguous()}
    save_file(tensors, str(path))


def _load_core_tensors(path: Path, ids: list) -> Core:
    tensors = load_file(str(path))
    vectors = tensors["W_enc_core"]
    # Cores written before biases were carried: 0 is what those cores started from anyway.
    bias = tensors.get("b_enc_core", torch.zeros(vectors.shape[1], dtype=vectors.dtype))
    return Core(vectors, [tuple(i) for i in ids], bias)


def _what(cfg: RunConfig) -> dict:
    return cfg.model_dump(exclude={"ray", "run_dir"})


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    for key in a:
        if a[key] != b.get(key):
            if isinstance(a[key], dict):
                return _diff(a[key], b.get(key, {}), f"{prefix}{key}.")
            return f"{prefix}{key}: stored {a[key]!r}, given {b.get(key)!r}"
    return "?"


class RunState:
    """The run's state, persisted on every change. The coordinator actor wraps one of these;
    a run without Ray uses it directly."""

    def __init__(self, rd: RunDir) -> None:
        self.rd = rd
        self.state = rd.load_state()

    def _save(self) -> dict:
        self.state["updated"] = time.time()
        self.rd.save_state(self.state)
        return self.state

    def get(self) -> dict:
        return self.state

    def update(self, **fields: Any) -> dict:
        self.state.update(fields)
        return self._save()

    def set_stage(self, stage: str | None, **progress: Any) -> dict:
        self.state["stage"] = stage
        self.state["progress"] = progress | {"stage_started": time.time()}
        return self._save()

    def set_progress(self, **progress: Any) -> dict:
        """Merge progress; with tokens_done/tokens_total also a rate and an ETA."""
        p = self.state["progress"] | progress
        started = p.get("stage_started", time.time())
        done, total = p.get("tokens_done"), p.get("tokens_total")
        if done and total:
            rate = done / max(time.time() - started, 1e-6)
            p["tokens_per_s"] = rate
            p["eta_s"] = max(total - done, 0) / rate
        self.state["progress"] = p
        return self._save()

    def commit_cycle(self, summary: dict) -> dict:
        """Idempotent: a cycle already committed (a retried call) is not appended twice."""
        if summary["cycle"] < self.state["cycle"]:
            return self.state
        if summary["cycle"] != self.state["cycle"]:
            raise ValueError(f"commit of cycle {summary['cycle']}, expected {self.state['cycle']}")
        self.state["cycles"].append(summary)
        self.state["cycle"] = summary["cycle"] + 1
        self.state["stage"], self.state["progress"] = "committed", {}
        return self._save()
