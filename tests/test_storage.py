"""The activation cache on a local directory, a file:// URI and an S3 bucket.

The bucket is served by moto's S3 server on a loopback port: a real HTTP endpoint speaking the
S3 protocol that pyarrow's S3 filesystem (the code path of s3:// on a cluster) talks to.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
from conftest import free_ports, tiny_config

from dmsae_ray import pipeline, storage
from dmsae_ray.config import ConfigError, validate

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
