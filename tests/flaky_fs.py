"""A local filesystem that fails like an object store: the first ``failures`` files closed
(every one, with ``failures=None``) raise the error pyarrow's S3 filesystem raises when
CompleteMultipartUpload fails, and the failed file is not stored.

The count lives in files under ``state``, so every process using a pickled copy (Ray workers)
shares it; ``closes(state)`` lists each close as ``ok path`` or ``failed path``. Ray workers
cannot import this module from tests/: register it with
``ray.cloudpickle.register_pickle_by_value`` so the class travels with the filesystem.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

INJECTED = (
    "When completing multiple part upload for key '{key}' in bucket 'flaky': AWS Error "
    "INTERNAL_FAILURE during CompleteMultipartUpload operation: injected by flaky_fs"
)
DENIED = "When uploading object with key '{key}': AWS Error ACCESS_DENIED: injected by flaky_fs"


def flaky(state: Path, failures: int | None, error: str = INJECTED) -> pafs.FileSystem:
    state.mkdir(parents=True, exist_ok=True)
    return pafs.PyFileSystem(FlakyHandler(str(state), failures, error))


def closes(state: Path) -> list[str]:
    log = state / "closes.log"
    return log.read_text().splitlines() if log.exists() else []


class _Stream(io.RawIOBase):
    def __init__(self, handler: FlakyHandler, path: str) -> None:
        self.handler, self.path, self.data = handler, path, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.data.write(b)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.handler.finish(self.path, self.data.getvalue())


class FlakyHandler(pafs.FileSystemHandler):
    def __init__(self, state: str, failures: int | None, error: str) -> None:
        self.state, self.failures, self.error = state, failures, error
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, FlakyHandler) and self.state == other.state

    def __ne__(self, other) -> bool:
        return not self == other

    def _fail_now(self) -> bool:
        if self.failures is None:
            return True
        for i in range(self.failures):  # take the first unused failure token, atomically
            try:
                os.close(os.open(f"{self.state}/failure-{i}", os.O_CREAT | os.O_EXCL))
                return True
            except FileExistsError:
                continue
        return False

    def finish(self, path: str, data: bytes) -> None:
        fail = self._fail_now()
        with open(f"{self.state}/closes.log", "a") as log:
            log.write(f"{'failed' if fail else 'ok'} {path}\n")
        if fail:
            raise OSError(self.error.format(key=path))
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def get_type_name(self) -> str:
        return "flaky"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise pa.ArrowNotImplementedError("no")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Stream(self, path), mode="w")

    def open_append_stream(self, path, metadata):
        raise pa.ArrowNotImplementedError("no appends on an object store")
