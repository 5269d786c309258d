"""DistillationCoordinator: a named, detached Ray actor per run that owns its cycle state.

Every change is persisted to the run directory (``RunState``), so a restart of the actor, of
the driver, or of the whole job resumes after the last committed cycle. Its methods are quick,
so it answers status queries while a cycle runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import ray

from dmsae_ray.run.rundir import RunDir, RunState

NAMESPACE = "dmsae"


def coordinator_name(run_dir: str | Path) -> str:
    key = str(Path(run_dir).expanduser().resolve())
    return "coordinator-" + hashlib.sha1(key.encode()).hexdigest()[:16]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DistillationCoordinator:
    def __init__(self, run_dir: str) -> None:
        # A restart re-runs __init__: memory is gone, the run directory is not.
        self.store = RunState(RunDir(run_dir))

    async def get(self) -> dict:
        return self.store.get()

    async def update(self, **fields: Any) -> dict:
        return self.store.update(**fields)

    async def set_stage(self, stage: str | None, **progress: Any) -> dict:
        return self.store.set_stage(stage, **progress)

    async def set_progress(self, **progress: Any) -> dict:
        return self.store.set_progress(**progress)

    async def commit_cycle(self, summary: dict) -> dict:
        return self.store.commit_cycle(summary)


def get_coordinator(run_dir: str | Path, create: bool = True) -> ray.actor.ActorHandle:
    name = coordinator_name(run_dir)
    if not create:
        return ray.get_actor(name, namespace=NAMESPACE)
    return DistillationCoordinator.options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(str(Path(run_dir).expanduser().resolve()))


class CoordinatorState:
    """The pipeline's State interface, answered by the coordinator actor."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def get(self) -> dict:
        return ray.get(self.handle.get.remote())

    def update(self, **fields: Any) -> dict:
        return ray.get(self.handle.update.remote(**fields))

    def set_stage(self, stage: str | None, **progress: Any) -> dict:
        return ray.get(self.handle.set_stage.remote(stage, **progress))

    def set_progress(self, **progress: Any) -> dict:
        return ray.get(self.handle.set_progress.remote(**progress))

    def commit_cycle(self, summary: dict) -> dict:
        return ray.get(self.handle.commit_cycle.remote(summary))
