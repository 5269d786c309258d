"""dmsae_ray/distributed/training.py, the Ray Train wrapper, in its parts and on the session's Ray
cluster: where each worker's rows come from (shard_by_block), how a resumed worker's cached batches
skip what it trained on, and the one line a worker failure prints. The whole of it, a training cycle
with a checkpoint restart, runs in tests/test_ray_pipeline.py; the step loop it wraps is tested in
tests/test_trainer.py and the SAE it hands to the driver in tests/test_sae_files.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import ray
import torch
from conftest import tiny_config

from dmsae_ray.config import RunConfig, validate
from dmsae_ray.distributed.training import FailureLine, _batches, shard_by_block

CPU = torch.device("cpu")
ROWS, DIM, BATCH, SEED = 600, 8, 64, 5  # 9 batches an epoch, 24 rows left out of each


def run_config(tiny_dir, tmp_path, workers: int = 2, cache: bool = True, mb: int = 1) -> RunConfig:
    return validate(
        tiny_config(
            tiny_dir,
            tmp_path / "run",
            data={"cache_activations": cache},
            train={"epoch_cache_mb": mb},
            ray={"enabled": True, "num_workers": workers, "cpus_per_worker": 0.5},
        )
    )


# ----------------------------------------------------------------------------- shard_by_block


def test_shard_by_block_only_where_each_worker_can_hold_the_whole_cache(
    ray_head, tiny_dir, tmp_path
):
    rows = ray.data.range(1024)  # 1024 rows of 256 float32 values: exactly 1 MB
    fits = run_config(tiny_dir, tmp_path, mb=1)
    assert shard_by_block(fits, rows, d_in=256) is True  # up to the byte
    assert shard_by_block(fits, rows, d_in=257) is False  # too big for train.epoch_cache_mb
    assert shard_by_block(run_config(tiny_dir, tmp_path, mb=0), rows, d_in=1) is False
    # One worker: there is nothing to split. No cache: every worker would run the LM on all.
    assert shard_by_block(run_config(tiny_dir, tmp_path, workers=1), rows, d_in=1) is False
    assert shard_by_block(run_config(tiny_dir, tmp_path, cache=False), rows, d_in=1) is False


# ----------------------------------------------------------------------------- _batches


def shard(order: np.ndarray | None = None):
    """The rows a worker reads, positions 1, 4, 7, ... (as in a token stream with gaps)."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    pos = np.arange(ROWS, dtype=np.int64) * 3 + 1
    order = np.arange(ROWS) if order is None else order
    return ray.data.from_items([{"x": rows[i], "pos": pos[i]} for i in order]).iterator()


@pytest.fixture(scope="module")
def uninterrupted(ray_head) -> list[torch.Tensor]:
    """An uninterrupted worker's first 30 batches: more than three epochs."""
    return list(itertools.islice(_batches(shard(), BATCH, CPU, SEED, 1 << 20), 30))


@pytest.mark.parametrize("done", [1, 8, 9, 13])  # within the first epoch, at its end, after it
def test_a_resumed_worker_skips_exactly_the_batches_already_trained_on(uninterrupted, done):
    arrival = np.random.default_rng(done).permutation(ROWS)  # rows arrive in another order
    resumed = _batches(shard(arrival), BATCH, CPU, SEED, 1 << 20, done=done)
    got = list(itertools.islice(resumed, 30 - done))
    assert len(got) == 30 - done
    assert all(torch.equal(a, b) for a, b in zip(got, uninterrupted[done:], strict=True))


def test_a_worker_sharded_by_block_keeps_its_blocks_and_skips_on_resume(ray_head):
    context = 16  # token blocks of 16 positions: rows of block b have pos // 16 == b
    data = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    pos = np.arange(ROWS) * 3 + 1
    per_rank = []
    for rank in range(2):

        def keep(p: torch.Tensor, rank: int = rank) -> torch.Tensor:
            return (p // context) % 2 == rank

        mine = data[(pos // context) % 2 == rank]
        epoch_len = len(mine) // BATCH
        batches = list(
            itertools.islice(_batches(shard(), BATCH, CPU, SEED, 1 << 20, keep=keep), epoch_len)
        )
        epoch = torch.cat(batches)
        # a permutation of this rank's rows, less the remainder of the last batch
        assert len(torch.unique(epoch, dim=0)) == epoch_len * BATCH
        assert set(map(tuple, epoch.tolist())) <= set(map(tuple, mine.tolist()))
        resumed = _batches(shard(), BATCH, CPU, SEED, 1 << 20, done=2, keep=keep)
        skipped = list(itertools.islice(resumed, epoch_len - 2))
        assert all(torch.equal(a, b) for a, b in zip(skipped, batches[2:], strict=True))
        per_rank.append(set(map(tuple, epoch.tolist())))
    assert not per_rank[0] & per_rank[1]  # no row on both workers


# ----------------------------------------------------------------------------- FailureLine


def test_a_worker_failure_is_one_line_saying_what_failed_and_that_a_retry_follows(capsys):
    traceback = (
        "Traceback (most recent call last):\n  File \"training.py\", line 1, in loop\n"
        "RuntimeError: injected worker failure at step 12 (DMSAE_FAULT_INJECT_STEP)\n"
    )
    FailureLine(cycle=3, max_failures=2).after_exception(
        None, {1: RuntimeError(""), 0: RuntimeError(traceback)}
    )
    assert capsys.readouterr().out.splitlines() == [
        "[cycle 3] training worker 0 failed: RuntimeError: injected worker failure at step 12 "
        "(DMSAE_FAULT_INJECT_STEP) (Ray Train retries from the last checkpoint, up to "
        "ray.max_failures=2 times per cycle)",
        "[cycle 3] training worker 1 failed:  (Ray Train retries from the last checkpoint, up "
        "to ray.max_failures=2 times per cycle)",
    ]
