"""Where shared files live: a local path or a URI (file://, s3://, gs://) via pyarrow.

Only what object stores can do is used: whole-file writes (a PUT is atomic), reads, existence
checks. Nothing is renamed, so "done" is a marker file written last, never a renamed directory.
Credentials come from the environment of each process (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
instance roles), never from the URI: a URI is logged and written into config.json.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(location: str) -> bool:
    return "://" in location


def check_location(location: str) -> str | None:
    """Why ``location`` is unusable, or None. Syntax only: nothing is contacted."""
    if not is_uri(location):
        return None
    parts = urlsplit(location)
    if parts.scheme not in SCHEMES:
        return f"scheme {parts.scheme!r} is not one of {', '.join(SCHEMES)}"
    if parts.username or parts.password:
        return "credentials in the URI would be logged and saved; put them in the environment"
    if parts.scheme != "file" and not parts.netloc:
        return f"{parts.scheme}:// needs a bucket or host"
    return None


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); URI query options such as ``endpoint_override`` apply."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"cannot open {location}: {err}") from None


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    """All or nothing: a local file is written aside and renamed, an object is one PUT."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
