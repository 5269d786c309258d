"""Ray Data does not keep activation rows in order (a cache written twice from the same tokens
held its blocks in different orders), so reproducibility rests on each row's position: the
norm factor is an exact sum, and a training worker whose share fits in memory sorts by position
before its seeded shuffle."""

from __future__ import annotations

import itertools

import numpy as np
import ray
import torch

from dmsae_ray.algo.trainer import estimate_norm_factor
from dmsae_ray.distributed.training import _batches
from dmsae_ray.model.data import valid_mask
from dmsae_ray.run.buffer import block_activations, block_activations_at


def test_norm_factor_is_the_same_for_the_same_rows_in_any_order():
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)) * 3
    shuffled = x[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    a = estimate_norm_factor([x[:300], x[300:]])
    b = estimate_norm_factor([shuffled[:7], shuffled[7:512], shuffled[512:]])
    assert a == b
    assert abs(a - float(x.pow(2).sum(-1).mean().sqrt())) < 1e-4
    assert estimate_norm_factor([x[:300], x[300:]], n_batches=1) == estimate_norm_factor([x[:300]])


def test_rows_carry_their_position_in_the_token_stream(tiny_lm):
    model, tok = tiny_lm
    ids = torch.randint(5, 100, (3, 10))
    ids[:, 0] = tok.bos_token_id
    specials = [tok.bos_token_id]
    x, pos = block_activations_at(model, ids, torch.tensor([7, 8, 9]), 1, specials)
    torch.testing.assert_close(x, block_activations(model, ids, 1, specials))
    expected = (torch.tensor([7, 8, 9])[:, None] * 10 + torch.arange(10))[valid_mask(ids, specials)]
    assert torch.equal(pos, expected) and len(pos) == 27


def _shard(rows: np.ndarray, pos: np.ndarray, order: np.ndarray):
    items = [{"x": rows[i], "pos": pos[i]} for i in order]
    return ray.data.from_items(items).iterator()


def test_training_batches_do_not_depend_on_the_order_rows_arrive_in(ray_head):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((600, 8)).astype(np.float32)
    pos = np.arange(600, dtype=np.int64) * 3 + 1
    cpu = torch.device("cpu")

    def first(order: np.ndarray, n: int = 25) -> list[torch.Tensor]:
        batches = _batches(_shard(rows, pos, order), 64, cpu, seed=5, cache_bytes=1 << 20)
        return list(itertools.islice(batches, n))  # nearly three epochs of 9 batches

    a = first(np.arange(600))
    b = first(rng.permutation(600))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Every epoch is a permutation of the rows (up to the batch remainder).
    epoch = torch.cat(a[:9])
    assert len(torch.unique(epoch, dim=0)) == 9 * 64
    # A worker resumed after 7 steps gets the batches an uninterrupted one has from step 8.
    resumed = _batches(_shard(rows, pos, np.arange(600)), 64, cpu, 5, 1 << 20, done=7)
    assert all(torch.equal(x, y) for x, y in zip(itertools.islice(resumed, 18), a[7:], strict=True))
    # A share larger than the memory budget streams, epoch after epoch.
    streamed = _batches(_shard(rows, pos, np.arange(600)), 64, cpu, seed=5, cache_bytes=0)
    assert all(x.shape == (64, 8) for x in itertools.islice(streamed, 20))


def test_token_blocks_carry_their_global_index(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmsae_ray.distributed import activations

    monkeypatch.setattr(activations, "BLOCKS_PER_FILE", 4)  # several files from 10 blocks
    blocks = (torch.full((6,), i) for i in range(10))
    activations.write_token_blocks(blocks, tmp_path / "tokens", 10, log=lambda s: None)
    files = sorted((tmp_path / "tokens").glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    assert [t.column("block").to_pylist() for t in tables] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [row[0] for t in tables for row in t.column("ids").to_pylist()] == list(range(10))
    assert activations.has_block_index(tmp_path / "tokens")
    pq.write_table(pa.table({"ids": [[1, 2]]}), files[0])  # the format before block indices
    assert not activations.has_block_index(tmp_path / "tokens")
