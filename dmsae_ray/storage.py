"""Where shared files live: a local path or a URI (file://, s3://, gs://) via pyarrow.

Only what object stores can do is used: whole-file writes (a PUT is atomic), reads, existence
checks. Nothing is renamed, so "done" is a marker file written last, never a renamed directory.
Credentials come from the environment of each process (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
instance roles), never from the URI: a URI is logged and written into config.json.

Object stores fail now and then (S3 answers 500/503, SlowDown, or an error inside a 200 OK to
CompleteMultipartUpload). Every write here, and every file written through ``retrying(fs)``,
is retried whole a bounded number of times with exponential backoff on such transient errors
(``Retry``), then fails with a ``StorageError`` naming the URI: never an endless loop.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(OSError):
    """A read or write of ``uri`` kept failing: the store is down, throttling or broken."""


@dataclass(frozen=True)
class Retry:
    """Attempts per operation (the first included) and the backoff between them: ``backoff_s``
    doubling up to ``max_backoff_s``, each with +-20% jitter. The default gives up after about
    8 s of waiting (plus the time of the 5 attempts themselves)."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(
            0.8, 1.2
        )


RETRY = Retry()

# Substrings of the errors pyarrow raises for a store that may answer next time (AWS SDK
# error names, HTTP statuses, curl/socket failures). Anything else (access denied, no such
# bucket, bad request) fails at once.
TRANSIENT_ERRORS = (
    "INTERNAL_FAILURE",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "NETWORK_CONNECTION",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Connection reset",
    "Connection refused",
    "timed out",
)


def is_transient(err: BaseException) -> bool:
    if isinstance(err, StorageError):
        return False  # already retried: retrying again would multiply the attempts
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return any(pattern in text for pattern in TRANSIENT_ERRORS)


def with_retries(fn: Callable[[], T], what: str, uri: str, retry: Retry = RETRY) -> T:
    """``fn()``, called again after transient errors up to ``retry.attempts`` times in all;
    then a ``StorageError`` saying what failed on which ``uri``. Other errors pass at once."""
    start = time.monotonic()
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == retry.attempts:
                raise StorageError(
                    f"{what} {uri} failed {attempt} times in {time.monotonic() - start:.1f}s "
                    f"(transient errors, retried with backoff); giving up. Last error: {err}"
                ) from err
            delay = retry.delay(attempt)
            log.warning("%s %s failed (attempt %d/%d), retrying in %.1fs: %s",
                        what, uri, attempt, retry.attempts, delay, err)
            time.sleep(delay)
    raise AssertionError("unreachable")  # retry.attempts < 1


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
    """(filesystem, path inside it); URI query options such as ``endpoint_override`` apply.

    s3:// defaults to ``allow_delayed_open=true``: a file smaller than one upload part (the
    activation cache's parquet files, COMMIT.json) is then one PUT, not CreateMultipartUpload +
    UploadPart + CompleteMultipartUpload: a third of the requests, and none of the failure modes
    of completing an upload (an error inside a 200 OK; a test server whose completion reply
    pyarrow cannot parse)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    parts = urlsplit(location)
    if parts.scheme == "s3" and "allow_delayed_open" not in dict(parse_qsl(parts.query)):
        query = "&".join(q for q in (parts.query, "allow_delayed_open=true") if q)
        location = parts._replace(query=query).geturl()
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"cannot open {location}: {err}") from None


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def uri(fs: pafs.FileSystem, path: str) -> str:
    """``path`` of ``fs`` as a URI, for messages (``s3://bucket/key``; a local path as is)."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, RetryingHandler):
        fs = fs.handler.fs
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}.get(fs.type_name)
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


def exists(fs: pafs.FileSystem, path: str, retry: Retry = RETRY) -> bool:
    info = with_retries(lambda: fs.get_file_info(path), "checking", uri(fs, path), retry)
    return info.type != pafs.FileType.NotFound


def read_text(fs: pafs.FileSystem, path: str, retry: Retry = RETRY) -> str:
    def read() -> str:
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    return with_retries(read, "reading", uri(fs, path), retry)


def write_text(fs: pafs.FileSystem, path: str, text: str, retry: Retry = RETRY) -> None:
    """All or nothing: a local file is written aside and renamed, an object is one PUT
    (retried whole on transient errors; ``StorageError`` when they persist)."""
    parent = path.rsplit("/", 1)[0]
    where = uri(fs, path)
    with_retries(lambda: fs.create_dir(parent, recursive=True), "creating", where, retry)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        os.replace(tmp, path)
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(text.encode())

    with_retries(put, "writing", where, retry)


# --- a filesystem whose files are each retried whole -----------------------------------------

SPOOL_BYTES = 64 * 2**20  # a file being written is kept in memory up to this, then on disk


def retrying(fs: pafs.FileSystem, retry: Retry = RETRY) -> pafs.FileSystem:
    """``fs``, except that each file opened for writing is kept aside (memory, then a temp
    file) and uploaded on close, whole, with ``retry``: a failed upload (a failed multipart
    completion included) cannot be resumed, only redone. Metadata calls are retried too.
    Picklable, so Ray Data's write tasks use it (``ds.write_parquet(path, filesystem=...)``)."""
    return pafs.PyFileSystem(RetryingHandler(fs, retry))


class _Upload:
    """The file object behind ``RetryingHandler.open_output_stream`` (for ``pa.PythonFile``)."""

    def __init__(self, fs: pafs.FileSystem, path: str, metadata, retry: Retry) -> None:
        self.fs, self.path, self.metadata, self.retry = fs, path, metadata, retry
        self.buffer = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def tell(self) -> int:
        return self.buffer.tell()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with_retries(self._put, "writing", uri(self.fs, self.path), self.retry)
        finally:
            self.buffer.close()

    def _put(self) -> None:
        self.buffer.seek(0)
        with self.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            shutil.copyfileobj(self.buffer, out, 8 * 2**20)


class RetryingHandler(pafs.FileSystemHandler):
    """See ``retrying``."""

    def __init__(self, fs: pafs.FileSystem, retry: Retry = RETRY) -> None:
        self.fs, self.retry = fs, retry

    def __eq__(self, other) -> bool:
        return (isinstance(other, RetryingHandler) and self.fs.equals(other.fs)
                and self.retry == other.retry)

    def __ne__(self, other) -> bool:
        return not self == other

    def _call(self, what: str, path: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, what, uri(self.fs, path), self.retry)

    def get_type_name(self) -> str:
        return f"retrying+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._call("checking", paths[0] if paths else "",
                          lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._call("listing", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._call("creating", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._call("deleting", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._call("deleting", path,
                   lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise pa.ArrowNotImplementedError("refusing to delete the whole filesystem")

    def delete_file(self, path):
        self._call("deleting", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self.fs.move(src, dest)  # not idempotent: a retry could find src gone

    def copy_file(self, src, dest):
        self._call("copying to", dest, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._call("opening", path, lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path):
        return self._call("opening", path, lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Upload(self.fs, path, metadata, self.retry), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)
