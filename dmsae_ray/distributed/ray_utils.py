"""Connecting to Ray: an existing cluster (``ray.address`` or $RAY_ADDRESS, as under
``ray job submit``) or a local one started by this process."""

from __future__ import annotations

import os
import signal
import threading
import time

import ray

from dmsae_ray.config import ConfigError, RayConfig
from dmsae_ray.distributed.ray_log import drop_known_noise, setup_local_worker


def connect(cfg: RayConfig) -> None:
    drop_known_noise()
    if ray.is_initialized():
        return
    # ray.init installs its own SIGTERM handler; keep ours so `ray job stop` ends the run as
    # "stopped" (the CLI turns SIGTERM into KeyboardInterrupt).
    handler = signal.getsignal(signal.SIGTERM)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Set before ray.init, so the cluster's every process inherits them
        # (docs/architecture.md, "Ray on small machines"):
        # without a dashboard Train V2 polls a state API that is not there;
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
        # no node of a cluster on this one machine is preempted: no watcher actor per cycle.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Logical CPUs above the physical count: trainer workers, activation actors and Data
        # tasks each claim one, and on 2 cores an exact count deadlocks.
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            _temp_dir=os.environ.get("DMSAE_RAY_TMP", "/tmp/ray_dmsae"),
            runtime_env={"worker_process_setup_hook": setup_local_worker},
        )
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _shortfall(cfg: RayConfig) -> str | None:
    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0), total.get("CPU", 0)
    if cfg.use_gpu and gpus < max(cfg.num_workers, 1):
        return (
            f"ray.use_gpu: asks for {max(cfg.num_workers, 1)} GPU worker(s) but the cluster has "
            f"{gpus:g} GPUs; set ray.use_gpu=false or add GPU nodes"
        )
    need_cpu = cfg.num_workers * (0 if cfg.use_gpu else cfg.cpus_per_worker)
    if need_cpu > cpus:
        return (
            f"ray.num_workers: {cfg.num_workers} workers x {cfg.cpus_per_worker} CPUs "
            f"(ray.cpus_per_worker) exceed the cluster's {cpus:g} CPUs"
        )
    return None


def check_resources(cfg: RayConfig) -> None:
    """Fail with the field named instead of waiting forever for resources that never come.

    An autoscaling cluster (GPU groups scaled to zero) is asked for the bundles and given
    ``ray.resource_wait_s`` to provide them before the run is refused.
    """
    missing = _shortfall(cfg)
    # A local cluster started by this process cannot grow: no point waiting.
    if missing and cfg.resource_wait_s > 0 and (cfg.address or os.environ.get("RAY_ADDRESS")):
        from ray.autoscaler.sdk import request_resources

        unit = {"GPU": 1} if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}
        request_resources(bundles=[unit] * max(cfg.num_workers, 1))
        deadline = time.time() + cfg.resource_wait_s
        while missing and time.time() < deadline:
            time.sleep(5)
            missing = _shortfall(cfg)
    if missing:
        raise ConfigError(f"invalid config:\n  {missing}")
