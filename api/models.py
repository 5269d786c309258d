"""Response schemas (they document the API at /docs; the request body is ``RunConfig``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["pending", "running", "stopping", "completed", "failed", "stopped"]


class CycleSummary(BaseModel):
    """A committed cycle as state.json records it."""

    model_config = ConfigDict(extra="allow")

    cycle: int
    core_in: int | None = Field(None, description="core size carried into this cycle")
    core_size: int | None = Field(None, description="latents selected as this cycle's core")
    jaccard: float | None = Field(None, description="Jaccard similarity to the previous core")
    fraction: float | None = Field(None, description="attribution fraction the core explains")
    seconds: float | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(
        default_factory=dict, description="l0, core_l0, fve, explained_variance, ce_loss_score, ..."
    )


class RayJob(BaseModel):
    job_id: str
    status: str = Field(description="PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED")
    message: str | None = None
    start_time: float | None = None
    end_time: float | None = None


class DistillationBrief(BaseModel):
    id: str
    status: Status
    error: str | None = None
    cycle: int = Field(description="the cycle being worked on (= number of committed cycles)")
    cycles_total: int = Field(description="cycle 0 plus distill.cycles")
    stage: str | None = None
    core_size: int | None = Field(None, description="core size of the last committed cycle")
    ray_job_id: str | None = None
    submitter: str | None = None
    created_at: float
    updated_at: float


class DriverLiveness(BaseModel):
    alive: bool
    reason: str
    heartbeat_age_s: float | None = Field(None, description="null: no heartbeat file")


class Distillation(DistillationBrief):
    progress: dict[str, Any] = Field(default_factory=dict)
    cycles: list[CycleSummary] = Field(default_factory=list)
    ray_job: RayJob | None = Field(None, description="the current job; null if Ray is down")
    ray_reachable: bool = True
    driver: DriverLiveness | None = Field(
        None, description="while state.json says running: whether its driver still beats"
    )
    job_ids: list[str] = Field(description="every Ray job of this run, the first submission first")
    idempotency_key: str | None = None
    config: dict[str, Any]


class DistillationPage(BaseModel):
    items: list[DistillationBrief]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class Artifact(BaseModel):
    path: str = Field(description="relative to the run directory; download at artifacts/{path}")
    size: int
    modified: float


class ArtifactList(BaseModel):
    items: list[Artifact]


class CycleDetail(BaseModel):
    cycle: int
    summary: CycleSummary | None = None
    core: dict[str, Any] | None = Field(None, description="cycles/NNN/core.json")
    metrics: dict[str, Any] | None = Field(None, description="cycles/NNN/sae/metrics.json")
    artifacts: list[Artifact] = Field(default_factory=list)


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    ray_version: str | None = None
    detail: str | None = None
