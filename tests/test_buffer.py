"""dmsae_ray/buffer.py: the activation cache's key, the shuffle buffer, the in-process cache,
and batching the LM over token blocks."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from dmsae_ray import buffer as buffer_mod
from dmsae_ray.buffer import (
    CachedActivations,
    block_activations,
    blocks_needed,
    cache_digest,
    cache_key,
    iter_activations,
    shuffled_batches,
)
from dmsae_ray.config import validate


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


def test_cache_digest_follows_what_the_activations_depend_on():
    base = cache_digest(cfg_with())
    assert len(base) == 16 and int(base, 16) >= 0
    assert cache_digest(cfg_with()) == base  # deterministic
    changed = {
        "model name": {"model": {"name": "other/model"}},
        "layer": {"model": {"layer": 4}},
        "dtype": {"model": {"dtype": "bfloat16"}},
        "revision": {"model": {"revision": "v2"}},
        "dataset": {"data": {"dataset": "other.jsonl"}},
        "text field": {"data": {"text_field": "body"}},
        "context length": {"data": {"context_length": 128}},
        # The held-out blocks come first: the training blocks start after them.
        "held-out blocks": {"data": {"attribution_sequences": 7}},
        "token budget": {"train": {"tokens_per_cycle": 8192}},
    }
    for what, sections in changed.items():
        assert cache_digest(cfg_with(**sections)) != base, what
    unrelated = {
        "sae.k": {"sae": {"k": 16}},
        "sae.width": {"sae": {"width": 512}},
        "train.lr": {"train": {"lr": 1e-2}},
        "train.seed": {"train": {"seed": 7}},
        "train.batch_size": {"train": {"batch_size": 128}},
        "distill": {"distill": {"tau": 0.5, "cycles": 1}},
        "attribution": {"attribution": {"pooling": "mean"}},
        "ray": {"ray": {"enabled": True, "num_workers": 2}},
        "run_dir": {"run_dir": "runs/b"},
        "caching on": {"data": {"cache_activations": True}},
        "where the cache is": {"data": {"cache_activations": True, "activation_cache": "/a"}},
    }
    for what, sections in unrelated.items():
        assert cache_digest(cfg_with(**sections)) == base, what


def test_cache_key_is_plain_json_and_names_the_blocks():
    key = cache_key(cfg_with())
    assert set(key) == {"model", "data", "blocks"} and key["blocks"] == 66
    assert "cache_activations" not in key["data"] and "activation_cache" not in key["data"]
    assert key["model"]["name"] == "some/model" and key["model"]["layer"] == 3


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


# ----------------------------------------------------------------------------- the cache


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


def test_build_stops_at_max_rows_and_round_trips(tmp_path):
    chunks = numbered_chunks([30, 30, 30])
    consumed = []

    def rows():
        for c in chunks:
            consumed.append(len(c))
            yield c
        raise AssertionError("read past max_rows")  # pragma: no cover

    cache = CachedActivations(tmp_path / "activations" / "train.safetensors")
    assert not cache.exists()
    lines: list[str] = []
    cache.build(rows(), max_rows=50, log=lines.append)
    assert consumed == [30, 30]  # stopped once 50 rows were there
    assert cache.exists()
    assert torch.equal(cache.load(), torch.cat(chunks)[:50])
    assert lines and lines[0].startswith("activations ") and "/50 tokens" in lines[-1]
    assert [p.name for p in cache.path.parent.iterdir()] == ["train.safetensors"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_build_leaves_no_temp_file(tmp_path, monkeypatch, error):
    def fail(tensors, path):
        Path(path).write_bytes(b"half")  # a partial file, then the failure
        raise error

    monkeypatch.setattr(buffer_mod, "save_file", fail)
    cache = CachedActivations(tmp_path / "train.safetensors")
    with pytest.raises(type(error)):
        cache.build(iter(numbered_chunks([10])), max_rows=10, log=lambda s: None)
    assert not cache.exists()
    assert list(tmp_path.iterdir()) == []


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
