"""api/policy.py without a server: what a submitted config may name (hub ids, built-in names,
paths under the operator's roots, activation caches under the cache prefixes). The same rules
through the REST API: test_api.py."""

from __future__ import annotations

import pytest

from api.policy import BUILTIN_DATASETS, BUILTIN_MODELS, Admission, Rejected
from dmsae_ray.config import EMBEDDED_CORPUS, EMBEDDED_MODEL, RunConfig
from dmsae_ray.model.gemma3_model import GEMMA3_CORPUS, GEMMA3_MODEL


def test_admission_rules_without_a_server(tmp_path):
    """api/policy.py alone: hub ids, built-in names, roots, cache prefixes."""
    # The names the model layer resolves itself, and no others.
    assert BUILTIN_MODELS == {EMBEDDED_MODEL, GEMMA3_MODEL}
    assert BUILTIN_DATASETS == {EMBEDDED_CORPUS, GEMMA3_CORPUS}
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "out").symlink_to(tmp_path)
    pol = Admission.from_options(
        model_roots=[tmp_path / "models"], data_roots=[tmp_path / "data"],
        cache_roots=[str(tmp_path / "cache"), "s3://bucket/acts?endpoint_override=minio:9000"],
    )

    def ok(key: str, value: str) -> bool:
        return pol.check_value(key, value)[1] is None

    for good in ("google/gemma-2-2b", "EleutherAI/pythia-70m", "stories15m", "gemma3-270m",
                 str(tmp_path / "models" / "m"), str(tmp_path / "models") + "/x/y"):
        assert ok("model.name", good), good
    for bad in ("/etc", "../models/m", "~/m", ".x/y", "a/../b", "a/b/c", "gemma", "a/..",
                "gemma3-corpus", str(tmp_path / "models" / "out" / "secret"),
                str(tmp_path / "models") + "/../x", "a/b\n", "", "ab/c d"):
        assert not ok("model.name", bad), bad
    assert ok("data.dataset", "monology/pile-uncopyrighted") and ok("data.dataset", "stories15m")
    assert ok("data.dataset", "gemma3-corpus") and not ok("data.dataset", "gemma3-270m")
    assert ok("data.dataset", str(tmp_path / "data" / "c.jsonl"))
    assert not ok("data.dataset", str(tmp_path / "models" / "m"))  # the model root only
    for good in (str(tmp_path / "cache" / "a"), f"file://{tmp_path}/cache/a",
                 "s3://bucket/acts/run1?endpoint_override=minio:9000"):
        assert ok("data.activation_cache", good), good
    for bad in (str(tmp_path / "other"), "s3://bucket/acts/run1", "s3://bucket/actsx",
                "s3://other/acts/a?endpoint_override=minio:9000",
                "s3://bucket/acts/../x?endpoint_override=minio:9000",
                "s3://bucket/acts/a?endpoint_override=evil:9000", "cache/a",
                f"file://evil{tmp_path}/cache/a"):
        assert not ok("data.activation_cache", bad), bad
    assert not ok("ray.address", "ray://head:10001") and ok("ray.address", None)
    assert not ok("distill.init_core", "0123456789ab")  # no runs to name
    with pytest.raises(Rejected) as err:
        pol.check(RunConfig.model_validate({"model": {"name": "/etc"}, "run_dir": "/x"}))
    assert [loc for loc, _ in err.value.errors] == [("model", "name"), ("run_dir",)]
