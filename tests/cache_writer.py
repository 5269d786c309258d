"""A writer of given activation rows for ``ActivationCache.open``, shared by the cache's own
tests (test_activation_cache.py) and the local backend's (test_local_backend.py), which hand
it a cache as the Ray backend writes it."""

from __future__ import annotations

from dmsae_ray.run.activation_cache import ActivationCache, write_rows


def writer(cache: ActivationCache, chunks, blocks: int | None, calls: list[str]):
    def write(where: str) -> int | None:
        calls.append(where)
        write_rows(cache.fs, where, iter(chunks), cache.retry)
        return blocks

    return write
