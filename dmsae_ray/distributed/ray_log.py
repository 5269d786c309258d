"""Ray's console output a run keeps: one line per stage and per progress interval.

Imported by every worker process of a local cluster (its ``worker_process_setup_hook``), so it
imports nothing but ``ray``, which those processes have loaded already.
"""

from __future__ import annotations

import logging
import os

import ray

# Log records Ray emits on every run that say nothing about it: (logger, message start). Each is
# dropped by a filter on its own logger, so every other record of those loggers, and every
# other warning, still shows.
KNOWN_NOISE = [
    # Train's PlacementGroupCleaner asks the state API, once a second, whether the controller is
    # alive; a local cluster started without the dashboard has no state API, so every question
    # fails, for the whole of training. The cluster dies with this process, and the placement
    # groups with it: there is nothing for the cleaner to clean.
    (
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        "Failed to query Ray Train Controller actor state",
    ),
    # We turn Ray Data's bars off when the output is not a terminal; it says so in every
    # process that runs a Dataset.
    ("ray.data._internal.progress", "Progress bars disabled"),
    # A TrainingReport(...) dump per ray.train.report, from a logger Train 2.60 names by its
    # file path, so it is outside `ray.train` and RunConfig's LoggingConfig does not reach it.
    ("ray.train.v2._internal.execution.context.py", "Reporting training result"),
]


class _DropRecord(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _logger_name(name: str) -> str:
    """A logger named by its module's file: that file's path in this installation (found
    without importing the module, which every worker process would then pay for)."""
    if not name.endswith(".py"):
        return name
    parts = name.removesuffix(".py").split(".")
    return os.path.join(os.path.dirname(ray.__file__), *parts[1:]) + ".py"


_FILTERS: dict[str, _DropRecord] = {}


def drop_known_noise() -> None:
    """Idempotent: the same filter object is added at most once to each logger."""
    if not _FILTERS:
        _FILTERS.update({_logger_name(n): _DropRecord(prefix) for n, prefix in KNOWN_NOISE})
    for name, f in _FILTERS.items():
        logging.getLogger(name).addFilter(f)


def setup_local_worker() -> None:
    """Every worker process of the local cluster (``worker_process_setup_hook``)."""
    drop_known_noise()
    # Train's state-API helpers find "the" cluster by looking for GCS processes on this machine
    # unless RAY_ADDRESS is set; with another Ray cluster running here they find several and the
    # cleaner's thread dies with a ConnectionError traceback. Point them at their own cluster.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
