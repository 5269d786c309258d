"""dmsae_ray/distributed/ray_log.py: the filters that drop Ray's known noise, and only it. Needs
Ray installed, no cluster. What a run on Ray prints: test_ray_pipeline.py."""

from __future__ import annotations

import logging
import os

from dmsae_ray.distributed.ray_log import KNOWN_NOISE, _logger_name, drop_known_noise


def test_known_ray_noise_is_dropped_and_nothing_else():
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    drop_known_noise()
    for name, prefix in KNOWN_NOISE:
        name = _logger_name(name)
        # a logger named by its module's file (Train's): that file must exist in this Ray
        assert not name.endswith(".py") or os.path.isfile(name), name
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(f"{prefix}: noise")
            logger.warning("anything else")
        finally:
            logger.removeHandler(handler)
    assert seen == ["anything else"] * len(KNOWN_NOISE)
