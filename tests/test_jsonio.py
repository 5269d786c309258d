"""dmsae_ray/jsonio.py: atomic JSON/text files (hidden temp file + rename) and tolerant reads."""

from __future__ import annotations

import json

import pytest

from dmsae_ray import jsonio
from dmsae_ray.jsonio import atomic_write_json, atomic_write_text, read_json, read_json_or_none


def test_atomic_write_json_round_trips_and_leaves_only_the_target(tmp_path):
    path = tmp_path / "deep" / "er" / "state.json"  # parents are created
    data = {"status": "running", "cycles": [{"cycle": 0, "jaccard": None}], "x": 1.5}
    atomic_write_json(path, data)
    assert read_json(path) == data
    assert path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    atomic_write_json(path, {"status": "completed"}, indent=None)
    assert path.read_text() == '{"status": "completed"}\n'
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_the_temporary_file_is_hidden_and_beside_the_target(tmp_path, monkeypatch):
    """Readers that list a directory (service.list_artifacts) skip dot-files: the temp file of
    a write in flight must be one, in the target's directory (a rename across filesystems is
    not atomic)."""
    seen: list[tuple[str, str]] = []
    real = jsonio.os.replace

    def spy(src, dst):
        seen.append((str(src), str(dst)))
        real(src, dst)

    monkeypatch.setattr(jsonio.os, "replace", spy)
    atomic_write_text(tmp_path / "a.txt", "hello")
    [(src, dst)] = seen
    assert dst == str(tmp_path / "a.txt")
    src_name = src.rsplit("/", 1)[1]
    assert src.startswith(str(tmp_path) + "/") and src_name.startswith(".a.txt.")
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_a_failing_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"cycle": 1})
    before = path.read_text()
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "half written \ud800")  # a lone surrogate fails mid-write
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not serialisable: fails before any file
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_interrupted_rename_removes_the_temp(tmp_path, monkeypatch):
    """KeyboardInterrupt (a stop's SIGTERM turned into one) is cleaned up like an error."""
    path = tmp_path / "state.json"
    atomic_write_json(path, {"cycle": 1})

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(jsonio.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"cycle": 2})
    assert read_json(path) == {"cycle": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_read_json_or_none_on_missing_partial_and_valid_files(tmp_path):
    assert read_json_or_none(tmp_path / "missing.json") is None
    partial = tmp_path / "partial.json"
    partial.write_text('{"status": "runn')
    assert read_json_or_none(partial) is None
    with pytest.raises(json.JSONDecodeError):
        read_json(partial)  # the strict reader does not hide it
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert read_json_or_none(empty) is None
    good = tmp_path / "good.json"
    good.write_text('[1, "two", null]')
    assert read_json_or_none(good) == [1, "two", None]
    assert read_json_or_none(str(good)) == [1, "two", None]  # str paths too


def test_digest_is_canonical_and_stable():
    # key order does not matter; any value changes it; the bytes are sha256 of sorted JSON,
    # so a digest written by an earlier version (a run's config_digest, a sweep's
    # request_digest, an activation cache's directory name) still matches
    a = {"sae": {"k": 8, "width": 256}, "distill": {"tau": 0.9}}
    b = {"distill": {"tau": 0.9}, "sae": {"width": 256, "k": 8}}
    assert jsonio.digest(a) == jsonio.digest(b)
    assert jsonio.digest(a) != jsonio.digest({**a, "distill": {"tau": 0.8}})
    import hashlib

    canonical = json.dumps(a, sort_keys=True).encode()
    assert jsonio.digest(a) == hashlib.sha256(canonical).hexdigest()
    assert len(jsonio.digest(a)) == 64
