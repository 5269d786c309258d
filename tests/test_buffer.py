"""dmsae_ray/run/buffer.py: the training blocks a budget needs, the shuffle buffer, the epochs
over rows held in memory, and batching the LM over token blocks. The activation cache itself:
test_activation_cache.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dmsae_ray.config import validate
from dmsae_ray.run.buffer import (
    CachedActivations,
    block_activations,
    block_activations_at,
    blocks_needed,
    iter_activations,
    iter_activations_at,
    shuffled_batches,
)


def cfg_with(run_dir="runs/a", **sections):
    data = {
        "model": {"name": "some/model", "layer": 3, "dtype": "float32"},
        "data": {"dataset": "corpus.jsonl", "context_length": 64},
        "sae": {"width": 256, "k": 8},
        "train": {"tokens_per_cycle": 4096, "batch_size": 256},
        "ray": {"enabled": False},
        "run_dir": run_dir,
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return validate(data)


def test_blocks_needed_covers_the_tokens_without_the_bos_of_each_block():
    assert blocks_needed(cfg_with()) == math.ceil(4096 / 63) == 66
    assert blocks_needed(cfg_with(train={"tokens_per_cycle": 630, "batch_size": 10},
                                  data={"context_length": 64})) == 10
    assert blocks_needed(cfg_with(train={"tokens_per_cycle": 631, "batch_size": 1})) == 11


# ----------------------------------------------------------------------------- shuffling


def numbered_chunks(sizes, d=3):
    """Chunks of rows whose first column is the row's global number."""
    out, start = [], 0
    for n in sizes:
        rows = torch.zeros(n, d)
        rows[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
        out.append(rows)
        start += n
    return out


def test_shuffled_batches_keep_every_row_once_in_full_batches():
    sizes = [50, 30, 70, 25, 40]  # 215 rows
    batches = list(shuffled_batches(iter(numbered_chunks(sizes)), 16, 64, seed=3))
    assert all(b.shape == (16, 3) for b in batches)
    ids = torch.cat(batches)[:, 0].long().tolist()
    assert len(ids) == 215 - 215 % 16  # only the last partial batch is dropped
    assert len(set(ids)) == len(ids) and set(ids) <= set(range(215))
    # Rows are mixed across chunks, not handed on in stream order.
    assert ids != sorted(ids)
    # The first batch already mixes the first two chunks (rows 0-49 and 50-79).
    assert {i < 50 for i in ids[:16]} == {True, False} and max(ids[:16]) < 80


def test_shuffled_batches_are_reproducible_by_seed():
    def run(seed):
        return torch.cat(list(shuffled_batches(iter(numbered_chunks([40] * 5)), 8, 32, seed)))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_shuffled_batches_of_fewer_rows_than_a_batch_yield_nothing():
    assert list(shuffled_batches(iter(numbered_chunks([5, 4])), 16, 64, seed=0)) == []
    assert list(shuffled_batches(iter([]), 16, 64, seed=0)) == []


# ----------------------------------------------------------------------------- epochs


def test_epochs_are_reshuffled_permutations_of_the_rows():
    acts = numbered_chunks([40])[0]
    gen = CachedActivations.epochs(acts, 8, seed=0)
    first = [next(gen) for _ in range(5)]  # one epoch: 40 // 8 batches
    second = [next(gen) for _ in range(5)]
    for epoch in (first, second):
        ids = torch.cat(epoch)[:, 0].long().sort().values
        assert torch.equal(ids, torch.arange(40))
    assert not torch.equal(torch.cat(first), torch.cat(second))
    again = CachedActivations.epochs(acts, 8, seed=0)
    assert all(torch.equal(next(again), b) for b in first)
    # A remainder smaller than a batch is left out of each epoch.
    odd = list(itertools.islice(CachedActivations.epochs(acts[:19], 8, seed=0), 4))
    assert all(len(b) == 8 for b in odd)
    assert len(set(torch.cat(odd[:2])[:, 0].tolist())) == 16


def test_epochs_refuse_fewer_rows_than_a_batch():
    with pytest.raises(ValueError, match="only 5 cached activations for a batch of 8"):
        next(CachedActivations.epochs(torch.zeros(5, 2), 8, seed=0))


# ----------------------------------------------------------------------------- the LM


def test_iter_activations_batches_blocks_like_one_forward(tiny_lm):
    model, tok = tiny_lm
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randint(5, 100, (12,), generator=gen) for _ in range(5)]
    for b in blocks:
        b[0] = tok.bos_token_id
    specials = [tok.bos_token_id]
    chunks = list(iter_activations(model, iter(blocks), 1, specials, llm_batch_size=2))
    assert [len(c) for c in chunks] == [22, 22, 11]  # 2 + 2 + 1 blocks, BOS dropped
    whole = block_activations(model, torch.stack(blocks), 1, specials)
    assert whole.dtype == torch.float32 and whole.shape == (55, model.config.hidden_size)
    torch.testing.assert_close(torch.cat(chunks), whole)


def test_rows_are_numbered_by_their_block_in_the_stream(tiny_lm):
    model, tok = tiny_lm
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randint(5, 100, (12,), generator=gen) for _ in range(5)]
    for b in blocks:
        b[0] = tok.bos_token_id
    blocks[3][6] = tok.bos_token_id  # a document boundary inside a block: dropped too
    specials = [tok.bos_token_id]
    chunks = list(iter_activations_at(model, iter(blocks), 1, specials, 2, first_block=10))
    assert [len(x) for x, _ in chunks] == [22, 21, 11]
    x, pos = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    whole, expected = block_activations_at(model, torch.stack(blocks), torch.arange(10, 15), 1,
                                           specials)
    assert torch.equal(pos, expected) and pos[0] == 10 * 12 + 1 and 13 * 12 + 6 not in pos
    torch.testing.assert_close(x, whole)
    # The same rows as without positions, bit for bit.
    plain = list(iter_activations(model, iter(blocks), 1, specials, llm_batch_size=2))
    assert all(torch.equal(a, b) for a, (b, _) in zip(plain, chunks, strict=True))
