"""The activation cache of both backends: where it lives, its format, its commit, its rows.

With ``data.cache_activations`` the training activations are computed once and read back every
cycle. One cache serves both backends: the in-process backend writes and reads it here with
plain pyarrow, the Ray backend writes it through Ray Data (``activations.cached_dataset``) and
takes its location, key and commit from here. Nothing here imports Ray.

Location: ``run_dir/activations_parquet``, or with ``data.activation_cache`` (a directory or
URI) ``<activation_cache>/<cache_digest>``, shared by every run that agrees on ``cache_key``.

Format: attempt directories of parquet files with the columns ``x`` (an activation row: a list
of ``d_in`` float32, tagged as Ray Data's tensor type so that Ray reads it as a tensor column)
and ``pos`` (int64, the row's position in the token stream, ``block * context_length + t``),
rows in any order; then ``COMMIT.json`` (``{"attempt", "key", "blocks"}``), written last, names
the one attempt that is read. Object stores cannot rename a directory, so a half-written
attempt (a killed writer) simply stays unnamed.

Content: the rows of the first ``blocks`` training blocks (all there are, when the corpus ends
first), at least the key's ``blocks``. The Ray backend writes exactly the key's blocks (its
commits leave ``blocks`` out); the in-process backend writes the LM batches it ran to get
``train.tokens_per_cycle`` rows, past the key's blocks by the block separators dropped and the
last batch's rest. Each backend trains on its own view: Ray on the key's blocks
(``ActivationCache.positions_end``), the in-process backend on the first ``tokens_per_cycle``
rows by position.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import Tensor

from dmsae_ray import storage
from dmsae_ray.config import RunConfig
from dmsae_ray.jsonio import digest
from dmsae_ray.run.buffer import blocks_needed

COMMIT = "COMMIT.json"  # written last: the cache is complete and names its attempt
# What Ray Data 2.60 writes for an ndarray column of rows (a large_list<float> underneath, the
# row shape as metadata); Ray reads a plain column carrying this tag as that tensor type.
RAY_TENSOR = "ray.data.arrow_tensor_v2"
FILE = "part-00000.parquet"  # the in-process writer's one file per attempt


def cache_key(cfg: RunConfig) -> dict:
    """Everything the cached activations depend on: runs that agree on it share a cache."""
    data = cfg.data.model_dump(mode="json", exclude={"cache_activations", "activation_cache"})
    return {"model": cfg.model.model_dump(mode="json"), "data": data, "blocks": blocks_needed(cfg)}


def cache_digest(cfg: RunConfig) -> str:
    """The name of a shared cache's subdirectory (both backends)."""
    return digest(cache_key(cfg))[:16]


def location(cfg: RunConfig, run_root: Path) -> tuple[pafs.FileSystem, str]:
    """``run_dir/activations_parquet`` by default; under ``data.activation_cache`` (a directory
    or URI) a subdirectory named by the digest of ``cache_key``, so that runs of one model,
    layer, corpus and token budget (a sweep's trials, a study's runs, reruns, either backend)
    compute the activations once."""
    if cfg.data.activation_cache is None:
        return storage.resolve(str(run_root / "activations_parquet"))
    fs, base = storage.resolve(cfg.data.activation_cache)
    return fs, storage.join(base, cache_digest(cfg))


@dataclass(frozen=True)
class Attempt:
    """The committed attempt: its directory, and the training blocks ``[0, blocks)`` whose rows
    it holds (``None``: the key's blocks, as the Ray backend writes them)."""

    path: str
    blocks: int | None


@dataclass(eq=False)
class ActivationCache:
    """One cache directory ``path`` of ``fs`` for the activations ``key`` describes; every read
    and write of its files retried on transient store errors (``retry``)."""

    fs: pafs.FileSystem
    path: str
    key: dict
    retry: storage.Retry = storage.RETRY

    @classmethod
    def of(cls, cfg: RunConfig, run_root: Path, retry: storage.Retry = storage.RETRY
           ) -> ActivationCache:
        fs, path = location(cfg, run_root)
        return cls(fs, path, cache_key(cfg), retry)

    @property
    def marker(self) -> str:
        return storage.join(self.path, COMMIT)

    def committed(self) -> Attempt | None:
        """The committed attempt, ``None`` before the first commit; a ``ValueError`` when the
        directory caches other activations (another key)."""
        if not storage.exists(self.fs, self.marker, self.retry):
            return None
        body = json.loads(storage.read_text(self.fs, self.marker, self.retry))
        if body.get("key", self.key) != self.key:  # commits before keys were recorded pass
            raise ValueError(
                f"{self.path} caches other activations: {body['key']} (expected {self.key})"
            )
        return Attempt(storage.join(self.path, body["attempt"]), body.get("blocks"))

    def open(self, write: Callable[[str], int | None], log: Callable[[str], None]) -> Attempt:
        """The committed attempt; first, with none committed, ``write(directory)`` fills a
        fresh attempt directory (returning how many training blocks' rows it wrote, ``None``
        for the key's blocks), which is then committed.

        Two runs writing the same cache at once both commit a complete attempt for the key
        (of different extents if their backends differ, which each backend's reading allows
        for); the last commit wins, and both read the attempt it names."""
        found = self.committed()
        if found is not None:
            log(f"reusing cached activations at {self.path}")
            return found
        attempt = uuid.uuid4().hex[:12]
        log(f"caching activations -> {storage.join(self.path, attempt)}")
        blocks = write(storage.join(self.path, attempt))
        body = {"attempt": attempt, "key": self.key}
        if blocks is not None:
            body["blocks"] = blocks
        storage.write_text(self.fs, self.marker, json.dumps(body, indent=1), self.retry)
        found = self.committed()
        assert found is not None  # just committed; commits are never removed
        return found

    def positions_end(self, attempt: Attempt) -> int | None:
        """Where the key's blocks end in the token stream (``blocks * context_length``) when
        ``attempt`` holds rows past them, else ``None``: a Ray run keeps the rows below it, the
        rows it writes itself."""
        if attempt.blocks is None or attempt.blocks <= self.key["blocks"]:
            return None
        return self.key["blocks"] * self.key["data"]["context_length"]

    def read(self, attempt: Attempt) -> tuple[Tensor, Tensor]:
        return read_rows(self.fs, attempt.path, self.retry)


# --- the files ---------------------------------------------------------------------------------


def schema(d_in: int) -> pa.Schema:
    """The columns as Ray Data writes them, so that each backend reads the other's files."""
    tensor = {"ARROW:extension:name": RAY_TENSOR, "ARROW:extension:metadata": json.dumps([d_in])}
    x = pa.field("x", pa.large_list(pa.field("element", pa.float32())), metadata=tensor)
    return pa.schema([x, pa.field("pos", pa.int64())])


def _table(x: Tensor, pos: Tensor) -> pa.Table:
    rows = x.detach().cpu().to(torch.float32).contiguous().numpy()
    n, d = rows.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * d)
    kind = schema(d)
    column = pa.LargeListArray.from_arrays(offsets, pa.array(rows.reshape(-1)), type=kind[0].type)
    return pa.Table.from_arrays([column, pa.array(pos.cpu().numpy().astype(np.int64))],
                                schema=kind)


def write_rows(
    fs: pafs.FileSystem,
    path: str,
    rows: Iterable[tuple[Tensor, Tensor]],
    retry: storage.Retry = storage.RETRY,
) -> int:
    """``(x, pos)`` chunks into the attempt directory ``path`` as one parquet file, a row group
    per chunk, without Ray; returns the number of rows. On an object store the file is kept
    aside and uploaded whole, retried (``storage.retrying``). A failed write removes what it
    wrote: the directory is this writer's alone."""
    target = fs if isinstance(fs, pafs.LocalFileSystem) else storage.retrying(fs, retry)
    file = storage.join(path, FILE)
    storage.with_retries(lambda: fs.create_dir(path, recursive=True), "creating",
                         storage.uri(fs, path), retry)
    n = 0
    try:
        with target.open_output_stream(file) as out:
            writer: pq.ParquetWriter | None = None
            try:
                for x, pos in rows:
                    if len(x) == 0:
                        continue
                    table = _table(x, pos)
                    if writer is None:
                        writer = pq.ParquetWriter(out, table.schema)
                    writer.write_table(table)
                    n += len(x)
            finally:
                if writer is not None:
                    writer.close()
        if n == 0:
            raise ValueError(f"no activation rows to cache in {storage.uri(fs, path)}")
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_dir(path)
        raise
    return n


def read_rows(
    fs: pafs.FileSystem, path: str, retry: storage.Retry = storage.RETRY
) -> tuple[Tensor, Tensor]:
    """Every row of the attempt directory ``path``, whoever wrote it, in token-stream order:
    ``x`` [n, d_in] float32 and ``pos`` [n] int64, sorted by ``pos``.

    Ray's tensor type is an extension type pyarrow knows only once Ray registered it: without
    Ray ``x`` reads as its storage (a list per row), with Ray as the extension; both work."""
    where = storage.uri(fs, path)
    table = storage.with_retries(
        lambda: pq.read_table(path, filesystem=fs, partitioning=None), "reading", where, retry
    )
    pos = np.array(table.column("pos").to_numpy(), dtype=np.int64)  # a writable copy
    x = _matrix(table.column("x"), where)
    del table
    if len(pos) > 1 and not bool(np.all(pos[:-1] < pos[1:])):
        order = np.argsort(pos, kind="stable")
        x, pos = x[order], pos[order]
    return torch.from_numpy(x), torch.from_numpy(pos)


def _matrix(column: pa.ChunkedArray, where: str) -> np.ndarray:
    """A column of equal-length float32 lists (plain, large, fixed-size, or an extension type
    over one of them) as one writable [rows, width] array."""
    parts, width = [], None
    for chunk in column.chunks:
        if isinstance(chunk, pa.ExtensionArray):
            chunk = chunk.storage
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise ValueError(f"{where}: x has missing rows")
        span = pc.min_max(pc.list_value_length(chunk))
        low, high = span["min"].as_py(), span["max"].as_py()
        if low != high or (width is not None and low != width):
            raise ValueError(f"{where}: x rows differ in length")
        width = low
        values = chunk.flatten()
        if values.type != pa.float32():
            raise ValueError(f"{where}: x holds {values.type}, not float32")
        parts.append(values.to_numpy(zero_copy_only=False).reshape(len(chunk), width))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts)  # a copy: arrays over pyarrow's buffers are read-only
