"""The activation cache on a local directory, a file:// URI and an S3 bucket.

The bucket is served by moto's S3 server on a loopback port: a real HTTP endpoint speaking the
S3 protocol that pyarrow's S3 filesystem (the code path of s3:// on a cluster) talks to. Keep
the objects written to it under pyarrow's upload part size (storage.resolve makes those one
PUT): moto 5.2 answers CompleteMultipartUpload with a <CompleteMultipartUploadResponse> root,
not S3's <CompleteMultipartUploadResult>, which pyarrow reads as an error embedded in a 200 OK,
so every multipart upload to it "fails" (and used to be retried for minutes per file).

Transient store errors are injected by tests/flaky_fs.py, a local filesystem that fails closes
the way pyarrow's S3 filesystem does.
"""

from __future__ import annotations

import json
import re
import time

import flaky_fs
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import free_ports, tiny_config

from dmsae_ray import storage
from dmsae_ray.config import ConfigError, validate
from dmsae_ray.distributed.activations import cached_dataset
from dmsae_ray.run import pipeline

FAST = storage.Retry(attempts=3, backoff_s=0.05, max_backoff_s=0.2)

RAY = {"enabled": True, "num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0}


def test_locations_are_checked_before_any_work(tmp_path):
    assert storage.check_location("runs/acts") is None
    assert storage.check_location("s3://bucket/acts?endpoint_override=h:1") is None
    assert "credentials" in storage.check_location("s3://key:secret@bucket/acts")
    assert "scheme 'ftp'" in storage.check_location("ftp://host/acts")
    assert "bucket" in storage.check_location("s3:///acts")

    def cfg(**data):
        c = tiny_config({"corpus": "c", "model": "m"}, tmp_path, ray={"enabled": True})
        c["data"] |= data
        return c

    with pytest.raises(ConfigError, match="data.activation_cache: credentials"):
        validate(cfg(activation_cache="s3://k:s@bucket/x"))
    with pytest.raises(ConfigError, match="set data.cache_activations: true"):
        validate(cfg(activation_cache="s3://bucket/x", cache_activations=False))
    remote = cfg()
    remote["run_dir"] = "s3://bucket/runs/a"
    with pytest.raises(ConfigError, match="run_dir: 's3://bucket/runs/a' is a URI"):
        validate(remote)
    off = cfg(activation_cache="s3://bucket/x")
    off["ray"] = {"enabled": False}
    with pytest.raises(ConfigError, match="needs ray.enabled: true"):
        validate(off)


def test_text_files_round_trip_locally_and_by_uri(tmp_path):
    for location in (str(tmp_path / "a"), (tmp_path / "b").as_uri()):
        fs, path = storage.resolve(location)
        marker = storage.join(path, "sub", "COMMIT.json")
        assert not storage.exists(fs, marker)
        storage.write_text(fs, marker, '{"attempt": "x"}')
        assert storage.exists(fs, marker) and json.loads(storage.read_text(fs, marker))
    assert sorted(p.name for p in (tmp_path / "a/sub").iterdir()) == ["COMMIT.json"]


def test_transient_write_errors_are_retried_then_reported(tmp_path):
    marker = str(tmp_path / "cache/COMMIT.json")

    # Two failed uploads, then the third attempt stores the file.
    fs = flaky_fs.flaky(tmp_path / "two", failures=2)
    storage.write_text(fs, marker, '{"attempt": "a"}', retry=FAST)
    assert [c.split()[0] for c in flaky_fs.closes(tmp_path / "two")] == ["failed", "failed", "ok"]
    assert json.loads(storage.read_text(fs, marker)) == {"attempt": "a"}

    # A file written through storage.retrying (as Ray Data's parquet writer does).
    fs = flaky_fs.flaky(tmp_path / "parquet", failures=2)
    table = pa.table({"x": [1.0, 2.0], "pos": [0, 1]})
    pq.write_table(table, str(tmp_path / "t.parquet"), filesystem=storage.retrying(fs, FAST))
    assert pq.read_table(str(tmp_path / "t.parquet")).equals(table)
    assert len(flaky_fs.closes(tmp_path / "parquet")) == 3

    # A store that keeps failing: a clear error naming the file, after FAST.attempts tries.
    (tmp_path / "cache/COMMIT.json").unlink()
    fs = flaky_fs.flaky(tmp_path / "down", failures=None)
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"writing {re.escape(marker)} failed 3 times"):
        storage.write_text(fs, marker, "{}", retry=FAST)
    assert time.monotonic() - start < 5
    assert len(flaky_fs.closes(tmp_path / "down")) == 3
    assert not storage.exists(fs, marker)

    # An error that retrying cannot fix (access denied) fails at once.
    fs = flaky_fs.flaky(tmp_path / "denied", failures=None, error=flaky_fs.DENIED)
    with pytest.raises(OSError, match="ACCESS_DENIED") as err:
        storage.write_text(fs, marker, "{}", retry=FAST)
    assert not isinstance(err.value, storage.StorageError)
    assert len(flaky_fs.closes(tmp_path / "denied")) == 1


def test_activation_cache_commits_through_transient_write_errors(ray_head, tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(flaky_fs)  # Ray workers cannot import tests/
    rows = [{"x": float(i), "pos": i} for i in range(32)]
    path, key = str(tmp_path / "cache"), {"blocks": 1}
    retried = list(ray.data.DataContext.get_current().retried_io_errors)

    fs = flaky_fs.flaky(tmp_path / "flaky", failures=2)
    lines: list[str] = []
    ds = ray.data.from_items(rows, override_num_blocks=1)
    out = cached_dataset(ds, fs, path, key, lines.append, retry=storage.Retry(4, 0.05, 0.2))
    assert sorted(r["pos"] for r in out.take_all()) == list(range(32))
    closes = flaky_fs.closes(tmp_path / "flaky")
    assert [c.split()[0] for c in closes].count("failed") == 2
    assert closes[-1] == f"ok {path}/COMMIT.json"
    assert ray.data.DataContext.get_current().retried_io_errors == retried  # restored

    # The store keeps failing: the write gives up after FAST.attempts tries of the one file
    # (Ray Data's own retries do not multiply them) with an error naming it; no commit.
    fs = flaky_fs.flaky(tmp_path / "down", failures=None)
    path = str(tmp_path / "down-cache")
    start = time.monotonic()
    ds = ray.data.from_items(rows, override_num_blocks=1)
    with pytest.raises(storage.StorageError, match=rf"writing {re.escape(path)}/\w+/.*failed 3"):
        cached_dataset(ds, fs, path, key, lines.append, retry=FAST)
    assert time.monotonic() - start < 60
    closes = flaky_fs.closes(tmp_path / "down")
    assert len(closes) == 3 and len(set(closes)) == 1 and closes[0].endswith(".parquet")
    assert not storage.exists(fs, f"{path}/COMMIT.json")
    assert ray.data.DataContext.get_current().retried_io_errors == retried


@pytest.fixture(scope="module")
def s3_bucket():
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    admin, _ = pafs.FileSystem.from_uri(f"s3://acts?{query}&allow_bucket_creation=true")
    admin.create_dir("acts")
    fs, _ = pafs.FileSystem.from_uri(f"s3://acts?{query}")
    try:
        yield fs, f"s3://acts/cache?{query}"
    finally:
        server.stop()


def test_small_objects_are_single_puts_in_s3(s3_bucket, tmp_path):
    _, uri = s3_bucket
    fs, path = storage.resolve(uri)  # allow_delayed_open: no multipart upload moto would break
    start = time.monotonic()
    path = f"{path}-probe"  # beside the cache the runs below check
    marker = storage.join(path, "COMMIT.json")
    storage.write_text(fs, marker, '{"attempt": "p"}')
    table = pa.table({"x": [1.0] * 1000})
    pq.write_table(table, storage.join(path, "t.parquet"), filesystem=storage.retrying(fs))
    assert json.loads(storage.read_text(fs, marker)) == {"attempt": "p"}
    assert pq.read_table(storage.join(path, "t.parquet"), filesystem=fs).equals(table)
    assert time.monotonic() - start < 10  # a failed multipart completion is retried for ~25 s
    fs.delete_dir(path)


def test_activation_cache_in_s3_is_shared_by_runs(ray_head, tiny_dir, tmp_path, s3_bucket):
    fs, uri = s3_bucket

    def run(name: str, k: int) -> tuple[dict, list[str]]:
        lines: list[str] = []
        cfg = tiny_config(
            tiny_dir, tmp_path / name, ray=RAY, distill={"cycles": 0},
            data={"activation_cache": uri}, sae={"k": k},
        )
        return pipeline.run(validate(cfg), log=lines.append), lines

    first, lines = run("first", k=8)
    assert first["status"] == "completed"
    assert any(line.startswith("caching activations -> acts/cache/") for line in lines)
    assert not (tmp_path / "first/activations_parquet").exists()  # nothing cached locally
    objects = [
        f.path for f in fs.get_file_info(pafs.FileSelector("acts/cache", recursive=True))
        if f.type == pafs.FileType.File
    ]
    markers = [p for p in objects if p.endswith("/COMMIT.json")]
    assert len(markers) == 1
    commit = json.loads(storage.read_text(fs, markers[0]))
    parquet = [p for p in objects if p.endswith(".parquet")]
    assert parquet and all(f"/{commit['attempt']}/" in p for p in parquet)
    assert commit["key"]["model"]["layer"] == 1 and commit["key"]["blocks"] > 0

    # Another run on the same model, layer and corpus (another k) reads the same objects.
    second, lines = run("second", k=6)
    assert second["status"] == "completed"
    assert any(line.startswith("reusing cached activations at acts/cache/") for line in lines)
    again = [f.path for f in fs.get_file_info(pafs.FileSelector("acts/cache", recursive=True))]
    assert sorted(p for p in again if p.endswith(".parquet")) == sorted(parquet)
    assert second["norm_factor"] == first["norm_factor"]  # estimated from the same rows
