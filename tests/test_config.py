import pytest

from dmsae_ray.config import (
    ConfigError,
    RunConfig,
    check_layer,
    embedded_default,
    load_config,
    validate,
)


def test_defaults_are_the_paper_reference_run():
    cfg = RunConfig()
    assert cfg.model.name == "google/gemma-2-2b" and cfg.model.layer == 12
    assert cfg.sae.width == 65_536 and cfg.sae.k == 320
    assert cfg.distill.tau == 0.9 and cfg.distill.cycles == 7
    assert cfg.train.tokens_per_cycle == 500_000_000 and cfg.train.batch_size == 2048
    assert cfg.attribution.mode == "splice" and cfg.attribution.quantile == 0.99
    assert cfg.sae.l0_budget == "dynamic" and cfg.distill.core_mode == "reselect"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"sae": {"widht": 10}}, "sae.widht"),
        ({"distill": {"tau": 1.5}}, "distill.tau"),
        ({"distill": {"tau": 0}}, "distill.tau"),
        ({"sae": {"k": 0}}, "sae.k"),
        ({"sae": {"k": -3}}, "sae.k"),
        ({"sae": {"width": 64, "k": 64}}, "sae.k"),
        ({"distill": {"max_core": 70000}}, "distill.max_core"),
        ({"sae": {"group_fractions": [0.5, 0.4]}}, "sae.group_fractions"),
        ({"attribution": {"mode": "ig"}}, "attribution.mode"),
        ({"modle": {}}, "modle"),
        # Non-finite numbers and sizes over the documented limits.
        ({"train": {"lr": float("inf")}}, "train.lr"),
        ({"train": {"betas": [float("nan"), 0.999]}}, "train.betas"),
        ({"train": {"betas": [0.9, 1.0]}}, "train.betas"),
        ({"sae": {"aux_alpha": float("nan")}}, "sae.aux_alpha"),
        ({"sae": {"group_fractions": [0.5, float("nan")]}}, "sae.group_fractions"),
        ({"ray": {"resource_wait_s": float("inf")}}, "ray.resource_wait_s"),
        ({"sae": {"width": 2**24 + 1}}, "sae.width"),
        ({"train": {"tokens_per_cycle": 10**12 + 1}}, "train.tokens_per_cycle"),
        ({"train": {"batch_size": 2**20 + 1}}, "train.batch_size"),
        ({"data": {"context_length": 131_073}}, "data.context_length"),
        ({"data": {"llm_batch_size": 65_537}}, "data.llm_batch_size"),
        ({"ray": {"num_workers": 1025}}, "ray.num_workers"),
        ({"distill": {"cycles": 1001}}, "distill.cycles"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        validate(data)
    assert field in str(err.value)


def test_layer_past_the_model_is_rejected_with_the_range():
    cfg = RunConfig()
    check_layer(cfg, 26)
    with pytest.raises(ConfigError, match=r"model.layer: must be in \[0, 11\]"):
        check_layer(cfg, 12)


def test_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sae:\n  k: 40\ndistill:\n  tau: 0.8\nsweep:\n  tau: [0.5]\n")
    cfg = load_config(path, ["sae.group_fractions=[0.5, 0.5]", "run_dir=/tmp/x"])
    assert cfg.sae.k == 40 and cfg.distill.tau == 0.8
    assert cfg.sae.group_fractions == [0.5, 0.5] and cfg.run_dir == "/tmp/x"
    assert cfg.sae.width == 65_536  # paper default for what the file leaves out
    with pytest.raises(ConfigError, match="sae.k"):
        load_config(path, ["sae.k=0"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["sae.k"])


def test_embedded_default_is_small():
    cfg = embedded_default()
    assert cfg.model.name == "stories15m" and cfg.distill.cycles >= 3
    assert load_config(None, ["distill.cycles=5"]).distill.cycles == 5


def test_limits_keep_the_paper_run_and_allow_their_maximum():
    cfg = validate({"sae": {"width": 2**24, "k": 2**24 - 1}, "distill": {"cycles": 1000},
                    "train": {"tokens_per_cycle": 10**12, "batch_size": 2**20},
                    "data": {"context_length": 131_072}, "ray": {"num_workers": 1024}})
    assert cfg.sae.width == 2**24 and cfg.train.tokens_per_cycle == 10**12
    assert RunConfig().sae.width == 65_536 and RunConfig().train.tokens_per_cycle == 500_000_000
