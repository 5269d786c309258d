"""dmsae_ray/run/local_backend.py on the tiny model: the activations a cycle trains on, cached
once and read back every cycle, and a cache of the key's blocks only (as the Ray backend writes
it) topped up from the stream. The cycle loop it runs in: test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cache_writer import writer
from conftest import tiny_config

from dmsae_ray.config import validate
from dmsae_ray.run.activation_cache import ActivationCache, cache_key
from dmsae_ray.run.local_backend import LocalBackend
from dmsae_ray.run.rundir import RunDir


def local_backend(tiny_dir, root: Path):
    """A LocalBackend of the tiny model whose activation cache is under ``root / "acts"``.
    Its budget is exactly 65 blocks of 63 tokens after their BOS: the BOS between documents
    inside those blocks is dropped too, so they hold fewer rows than the budget."""
    cfg = validate(tiny_config(tiny_dir, root / "run", train={"tokens_per_cycle": 65 * 63},
                               data={"activation_cache": str(root / "acts")}))
    lines: list[str] = []
    backend = LocalBackend(cfg, RunDir(cfg.run_dir), lines.append)
    backend.open_state()
    return backend, lines


@pytest.fixture(scope="module")
def local_run(tiny_dir, tmp_path_factory):
    return local_backend(tiny_dir, tmp_path_factory.mktemp("local"))


def test_the_local_backend_trains_on_the_first_rows_of_the_stream(local_run):
    backend, lines = local_run
    cfg = backend.cfg
    want = cfg.train.tokens_per_cycle
    acts = backend._cached(0)
    stream: list[torch.Tensor] = []
    for chunk in backend._rows():  # the uncached path's stream, in the same LM batches
        stream.append(chunk)
        if sum(len(c) for c in stream) >= want:
            break
    assert acts.shape == (want, backend.d_in) and torch.equal(acts, torch.cat(stream)[:want])
    assert any(line.startswith("caching activations -> ") for line in lines)
    attempt = ActivationCache.of(cfg, Path(cfg.run_dir)).committed()
    # Whole LM batches until the budget: past the key's blocks.
    assert attempt is not None and attempt.blocks > cache_key(cfg)["blocks"]
    assert attempt.blocks % cfg.data.llm_batch_size == 0
    assert torch.equal(backend._cached(1), acts)  # read back, the same every cycle
    assert lines[-1].startswith("reusing cached activations at ")


def test_the_local_backend_tops_up_a_cache_of_the_keys_blocks(local_run, tiny_dir, tmp_path):
    """A cache as the Ray backend writes it, the rows of the key's blocks and no more, is
    short of the budget: the rest comes from the stream past those blocks."""
    first, _ = local_run
    own = first._cached(0)
    mine = ActivationCache.of(first.cfg, Path(first.cfg.run_dir))
    x, pos = mine.read(mine.committed())
    blocks = mine.key["blocks"]
    keep = pos < blocks * first.cfg.data.context_length
    n = int(keep.sum())
    assert 0 < n < len(own)

    backend, lines = local_backend(tiny_dir, tmp_path)
    ray_like = ActivationCache.of(backend.cfg, Path(backend.cfg.run_dir))
    assert ray_like.key == mine.key and ray_like.path != mine.path
    ray_like.open(writer(ray_like, [(x[keep], pos[keep])], None, []), lambda s: None)
    topped = backend._cached(0)
    assert lines[-1].startswith(f"the cache holds {n} of {len(own)} rows: ")
    assert lines[-1].endswith(f" more computed from block {blocks} on")
    assert topped.shape == own.shape and torch.equal(topped[:n], own[:n])
    # The rest is the same stream run in other LM batches: equal up to float rounding.
    torch.testing.assert_close(topped[n:], own[n:])
