"""dmsae_ray/run/activation_cache.py: the one activation cache of both backends. Its key and
location, the commit (an attempt named by COMMIT.json with its key), the parquet rows written
without Ray and read back in token-stream order, and each backend reading what the other wrote.
The local backend's reads of it (its budget, a top-up): test_local_backend.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_writer import writer
from test_buffer import cfg_with

from dmsae_ray import storage
from dmsae_ray.run.activation_cache import (
    COMMIT,
    FILE,
    ActivationCache,
    Attempt,
    cache_digest,
    cache_key,
    location,
    read_rows,
    write_rows,
)


def rows(n_blocks: int, context: int = 8, d: int = 4, seed: int = 0, first_block: int = 0):
    """Stream-ordered ``(x, pos)`` of blocks whose position 0 (the BOS) is dropped, one chunk
    per two blocks, as the in-process LM loop hands them on."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(first_block, first_block + n_blocks, 2):
        blocks = torch.arange(b, min(b + 2, first_block + n_blocks))
        pos = (blocks[:, None] * context + torch.arange(1, context)).reshape(-1)
        out.append((torch.randn(len(pos), d, generator=gen), pos))
    return out


def cat(chunks):
    return torch.cat([x for x, _ in chunks]), torch.cat([p for _, p in chunks])


def local_cache(tmp_path: Path, key: dict | None = None) -> ActivationCache:
    fs, path = storage.resolve(str(tmp_path / "cache"))
    return ActivationCache(fs, path, key or {"blocks": 4, "data": {"context_length": 8}})


# ----------------------------------------------------------------------------- key, location


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
    assert json.loads(json.dumps(key)) == key


def test_both_backends_use_one_location(tmp_path):
    run = tmp_path / "run"
    fs, path = location(cfg_with(run_dir=str(run)), run)
    assert path == str((run / "activations_parquet").resolve())
    shared = {"cache_activations": True, "activation_cache": str(tmp_path / "acts")}
    local = cfg_with(data=shared)
    on_ray = cfg_with(data=shared, ray={"enabled": True, "num_workers": 2})
    expected = str((tmp_path / "acts").resolve() / cache_digest(local))
    assert location(local, run)[1] == location(on_ray, run)[1] == expected
    as_uri = cfg_with(data={**shared, "activation_cache": (tmp_path / "acts").as_uri()})
    assert location(as_uri, run)[1].rstrip("/").endswith(f"acts/{cache_digest(local)}")


# ----------------------------------------------------------------------------- the files


def test_rows_round_trip_in_token_stream_order(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "attempt"))
    chunks = rows(5)
    assert write_rows(fs, path, iter(chunks)) == 5 * 7
    assert [p.name for p in (tmp_path / "attempt").iterdir()] == [FILE]
    x, pos = read_rows(fs, path)
    want_x, want_pos = cat(chunks)
    assert x.dtype == torch.float32 and pos.dtype == torch.int64
    assert torch.equal(x, want_x) and torch.equal(pos, want_pos)
    # Rows stored out of order (as Ray Data writes them) come back sorted by position.
    fs, path = storage.resolve(str(tmp_path / "shuffled"))
    write_rows(fs, path, iter(reversed(chunks)))
    x, pos = read_rows(fs, path)
    assert torch.equal(x, want_x) and torch.equal(pos, want_pos)


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_removes_its_attempt_and_commits_nothing(tmp_path, error):
    cache = local_cache(tmp_path)

    def failing(where: str) -> int:
        def chunks():
            yield from rows(2)
            raise error

        write_rows(cache.fs, where, chunks())
        raise AssertionError("unreachable")  # pragma: no cover

    with pytest.raises(type(error)):
        cache.open(failing, lambda s: None)
    assert cache.committed() is None
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------------------- the commit


def test_a_cache_is_written_once_then_reused(tmp_path):
    cache = local_cache(tmp_path)
    assert cache.committed() is None
    calls: list[str] = []
    lines: list[str] = []
    attempt = cache.open(writer(cache, rows(6), 6, calls), lines.append)
    assert len(calls) == 1 and attempt == Attempt(calls[0], 6)
    assert lines == [f"caching activations -> {calls[0]}"]
    body = json.loads((tmp_path / "cache" / COMMIT).read_text())
    assert body == {"attempt": Path(calls[0]).name, "key": cache.key, "blocks": 6}
    again = local_cache(tmp_path).open(writer(cache, rows(6), 6, calls), lines.append)
    assert again == attempt and len(calls) == 1  # nothing written the second time
    assert lines[-1] == f"reusing cached activations at {cache.path}"
    assert torch.equal(cache.read(again)[0], cat(rows(6))[0])


def test_an_uncommitted_attempt_is_never_read(tmp_path):
    cache = local_cache(tmp_path)
    stray = storage.join(cache.path, "killedwriter")  # files written, then the writer died
    write_rows(cache.fs, stray, iter(rows(4, seed=1)))
    assert cache.committed() is None
    calls: list[str] = []
    attempt = cache.open(writer(cache, rows(4, seed=2), None, calls), lambda s: None)
    assert attempt.path == calls[0] != stray and attempt.blocks is None
    x, _ = cache.read(attempt)
    assert torch.equal(x, cat(rows(4, seed=2))[0])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [COMMIT, "killedwriter", Path(calls[0]).name]
    )


def test_a_cache_of_another_key_is_refused(tmp_path):
    cache = local_cache(tmp_path)
    cache.open(writer(cache, rows(4), 4, []), lambda s: None)
    other = local_cache(tmp_path, key={"blocks": 5, "data": {"context_length": 8}})
    with pytest.raises(ValueError, match="caches other activations"):
        other.committed()
    calls: list[str] = []
    with pytest.raises(ValueError, match="caches other activations"):
        other.open(writer(other, rows(5), 5, calls), lambda s: None)
    assert calls == []


def test_only_rows_past_the_keys_blocks_call_for_a_filter(tmp_path):
    cache = local_cache(tmp_path)  # 4 blocks of 8 tokens
    assert cache.positions_end(Attempt("a", None)) is None  # the Ray backend's own
    assert cache.positions_end(Attempt("a", 4)) is None
    assert cache.positions_end(Attempt("a", 6)) == 4 * 8


# ----------------------------------------------------------------------------- across backends


def test_a_cache_written_by_ray_data_is_read_without_ray(ray_head, tmp_path):
    import ray

    from dmsae_ray.distributed.activations import cached_dataset

    d, context = 4, 8
    x, pos = cat(rows(6, context, d))
    order = np.random.default_rng(0).permutation(len(pos))  # Ray keeps no order anyway
    items = [{"x": x[i].numpy(), "pos": int(pos[i])} for i in order]
    cache = local_cache(tmp_path, key={"blocks": 6, "data": {"context_length": context}})
    ds = ray.data.from_items(items, override_num_blocks=3)
    out = cached_dataset(ds, cache.fs, cache.path, cache.key, lambda s: None)
    assert sorted(r["pos"] for r in out.take_all()) == sorted(pos.tolist())
    attempt = cache.committed()
    assert attempt is not None and attempt.blocks is None  # a Ray commit: the key's blocks

    # In this process Ray has registered its tensor type: x reads as that extension.
    got_x, got_pos = cache.read(attempt)
    assert torch.equal(got_x, x) and torch.equal(got_pos, pos)

    # A process without Ray reads x as the extension's storage. There the columns of Ray's
    # files and of the in-process writer's (Ray's tag on a plain list column) are the same.
    fs, local = storage.resolve(str(tmp_path / "local"))
    write_rows(fs, local, iter(rows(2, context, d)))
    out_file = tmp_path / "read.pt"
    script = f"""
import sys
import pyarrow.parquet as pq
from pathlib import Path
import torch
from dmsae_ray import storage
from dmsae_ray.run.activation_cache import read_rows, schema
files = sorted(Path({attempt.path!r}).glob("*.parquet")) + [Path({local!r}) / {FILE!r}]
assert len(files) > 1
assert all(pq.read_schema(f).equals(schema({d}), check_metadata=True) for f in files)
x, pos = read_rows(*storage.resolve({attempt.path!r}))
assert "ray" not in sys.modules, "the cache reader imported Ray"
torch.save({{"x": x, "pos": pos}}, {str(out_file)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    read = torch.load(out_file)
    assert torch.equal(read["x"], x) and torch.equal(read["pos"], pos)


def test_a_cache_written_without_ray_is_read_by_ray_data(ray_head, tmp_path):
    import ray

    from dmsae_ray.distributed.activations import cached_dataset

    context, d = 8, 4
    key = {"blocks": 4, "data": {"context_length": context}}
    dtypes = {"x": torch.float32, "pos": torch.int64}

    def as_training_reads(ds) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(ds.iter_torch_batches(batch_size=5, dtypes=dtypes))
        x, pos = torch.cat([b["x"] for b in batches]), torch.cat([b["pos"] for b in batches])
        order = torch.argsort(pos)
        return x[order], pos[order]

    unused = ray.data.from_items([{"never": 0}])  # committed already: nothing is computed
    for name, blocks in (("exact", 4), ("longer", 6)):
        cache = local_cache(tmp_path / name, key)
        chunks = rows(blocks, context, d)
        cache.open(writer(cache, chunks, blocks, []), lambda s: None)
        lines: list[str] = []
        x, pos = as_training_reads(cached_dataset(unused, cache.fs, cache.path, key, lines.append))
        assert lines == [f"reusing cached activations at {cache.path}"]
        # The key's 4 blocks, as a Ray run writes them: the in-process writer's extra blocks
        # (whole LM batches past them) are left out.
        want_x, want_pos = cat(rows(4, context, d)) if blocks == 4 else cat(chunks)
        keep = want_pos < 4 * context
        assert x.shape == (28, d)
        assert torch.equal(x, want_x[keep]) and torch.equal(pos, want_pos[keep])
