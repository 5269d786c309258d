"""Atomic JSON files: the one writer every run, sweep and service file goes through; directories
written as a whole (``atomic_directory``); and the one digest of JSON data (config, request and
cache identities).

A file is written to a hidden temporary name beside its target and renamed into place, so a
reader (another process, a restarted service) never sees half of one. Torch- and Ray-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A directory built under a hidden temporary name beside ``path`` (the block writes into the
    yielded one) and renamed into place when the block ends: a reader (the driver after a
    worker, a resumed run) finds the old directory or the whole new one. An existing ``path`` is
    replaced. On an error or an interrupt the temporary copy is removed: nothing else would."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0700 would outlive the rename, and the driver and the
    # workers of a cluster may read the directory as other users; mkdir applies the umask.
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_json_or_none(path: str | Path) -> Any:
    """The file's data, or None when it is missing or not (yet) valid JSON."""
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def digest(data: Any) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys; anything JSON cannot hold as its
    ``str``): equal data, equal digest, in every process and version. What a run computes,
    a sweep request and an activation cache are each named by one."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
