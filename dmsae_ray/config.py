"""Typed run configuration, validated at the edge before any work starts.

Defaults are the paper's reference run (docs/algorithm.md): gemma-2-2b, layer-12
residual stream, 65,536 latents, k=320, tau=0.9, 7 distillation cycles after cycle 0,
500M tokens per cycle. Every choice the spec marks as open ([I]) is a field here.
``embedded_default()`` is the small no-network preset that ``dmsae run`` uses with no config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dmsae_ray.storage import check_location, is_uri

# SAEBench / dictionary_learning Matryoshka group fractions (docs/algorithm.md section 2).
DEFAULT_GROUP_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]
EMBEDDED_MODEL = "stories15m"
EMBEDDED_CORPUS = "stories15m"


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what is allowed."""


class MissingInputError(FileNotFoundError, ConfigError):
    """A model or dataset the config names cannot be found (a bad input, not a crash)."""


class _Strict(BaseModel):
    # A typo in a key must fail loudly instead of silently running the default.
    # NaN and +-Infinity are refused in every float field (a JSON body may carry them).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    name: str = Field(
        "google/gemma-2-2b",
        description="HF hub id, local model directory, or an embedded model: 'stories15m' "
        "(the default preset) or 'gemma3-270m' (fetched from PyPI; docs/models.md)",
    )
    layer: int = Field(12, ge=0, le=4096, description="hook the output of decoder layer L "
                       "(<= 4096; checked against the model's depth before any work)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="LM dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    attn_implementation: str | None = Field(
        "eager", description="eager is what Gemma-2 needs for its logit softcapping"
    )
    revision: str | None = None


class DataConfig(_Strict):
    dataset: str = Field(
        "monology/pile-uncopyrighted",
        description="HF dataset name, local file/dir (.txt/.jsonl/.parquet), or an embedded "
        "corpus: 'stories15m' or 'gemma3-corpus'",
    )
    split: str = "train"
    text_field: str = "text"
    context_length: int = Field(1024, ge=8, le=131_072, description="tokens per block, <= 131072")
    attribution_sequences: int = Field(
        256, ge=1, le=2**20,
        description="held-out blocks scored every cycle (2^18 tokens at 1024), <= 2^20",
    )
    eval_sequences: int = Field(32, ge=1, le=2**20, description="held-out blocks for metrics, "
                                "<= 2^20")
    llm_batch_size: int = Field(32, ge=1, le=65_536, description="sequences per LM forward, "
                                "<= 65536")
    cache_activations: bool = Field(
        False, description="store training activations once and reuse them every cycle"
    )
    activation_cache: str | None = Field(
        None,
        description="where the cache lives: a directory or URI (file://, s3://, gs://) shared "
        "by runs of the same model, layer and data; default: run_dir/activations_parquet",
    )

    @model_validator(mode="after")
    def _cache(self) -> DataConfig:
        if self.activation_cache is not None:
            if not self.cache_activations:
                raise ValueError(
                    "data.activation_cache is set but data.cache_activations is false: "
                    "set data.cache_activations: true to use it"
                )
            why = check_location(self.activation_cache)
            if why:
                raise ValueError(f"data.activation_cache: {why}")
        return self


class SAEConfig(_Strict):
    width: int = Field(
        65_536, ge=2, le=2**24, description="total dictionary width K, core included, <= 2^24"
    )
    k: int = Field(320, gt=0, le=2**24, description="target average L0 (BatchTopK k), < width")
    group_fractions: list[float] = Field(
        default_factory=lambda: list(DEFAULT_GROUP_FRACTIONS), min_length=1, max_length=1024,
        description="Matryoshka group sizes as fractions summing to 1 (at most 1024 groups)",
    )
    group_mode: Literal["fractions", "absolute"] = Field(
        "fractions",
        description="fractions: split K-c; absolute: fixed boundaries, the core eats into G_0",
    )
    l0_budget: Literal["dynamic", "fixed"] = Field(
        "dynamic",
        description="relu core only: the non-core budget is k*B minus the core's firings "
        "(dynamic) or all of k*B (fixed)",
    )
    core_activation: Literal["relu", "batchtopk"] = Field(
        "relu",
        description="relu: the core fires outside BatchTopK (the paper's description; core L0 "
        "can exceed k, reported as l0_overflow); batchtopk: core latents compete in the same "
        "top-(k*B) and obey the same inference threshold (total L0 = k)",
    )
    core_bias: Literal["zero", "carry"] = Field(
        "zero",
        description="where a core latent's encoder bias starts: 0, or the bias it had when "
        "it was selected",
    )
    core_decoder_init: Literal["random", "tied"] = "random"
    bias_level: bool = Field(False, description="add a b_dec(+core)-only nested level")
    aux_alpha: float = Field(1 / 32, ge=0)
    dead_tokens: int = Field(
        10_000_000, gt=0, le=10**12, description="dead after this many tokens unfired, <= 10^12"
    )
    threshold_beta: float = Field(0.999, ge=0, lt=1)
    threshold_start_step: int = Field(1000, ge=0, le=10**9, description="<= 10^9")
    normalize_activations: bool = True
    norm_batches: int = Field(
        100, ge=1, le=100_000, description="batches used to estimate norm_factor, <= 100000"
    )

    @model_validator(mode="after")
    def _groups(self) -> SAEConfig:
        fr = self.group_fractions
        if not fr or any(f <= 0 for f in fr):
            raise ValueError("sae.group_fractions must be a non-empty list of positive numbers")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"sae.group_fractions must sum to 1 (got {sum(fr):.6f})")
        if self.k >= self.width:
            raise ValueError(f"sae.k must be in [1, sae.width={self.width}) (got {self.k})")
        return self


class TrainConfig(_Strict):
    tokens_per_cycle: int = Field(
        500_000_000, gt=0, le=10**12, description="training tokens per cycle, <= 10^12"
    )
    batch_size: int = Field(2048, gt=0, le=2**20, description="SAE batch in tokens, <= 2^20")
    lr: float = Field(3e-4, gt=0, description="finite, > 0")
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="Adam betas, each finite and in [0, 1)"
    )
    warmup_steps: int = Field(1000, ge=0, le=10**9, description="<= 10^9")
    decay_start: float = Field(0.8, gt=0, le=1, description="linear decay from this fraction")
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=-(2**62), le=2**62, description="|seed| <= 2^62")
    log_every: int = Field(50, gt=0, le=10**9, description="steps between progress lines")
    epoch_cache_mb: int = Field(
        1024, ge=0, le=2**24,
        description="a worker keeps its activations in memory when they fit (<= 2^24 MB)",
    )
    checkpoint_every: int = Field(
        1000, gt=0, le=10**9, description="steps between checkpoints (a multiple of log_every)"
    )
    fast_path: bool = Field(
        True,
        description="sparse top-k decoder and fused encoder selection; false: the dense eager "
        "reference (same results, slower; for debugging)",
    )


    @model_validator(mode="after")
    def _betas(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must each be in [0, 1) (got {list(self.betas)})")
        return self

    @model_validator(mode="after")
    def _checkpoints(self) -> TrainConfig:
        if self.checkpoint_every % self.log_every:
            raise ValueError(
                f"train.checkpoint_every must be a multiple of train.log_every={self.log_every}"
            )
        return self


class AttributionConfig(_Strict):
    mode: Literal["splice", "error_term"] = "splice"
    pooling: Literal["quantile", "mean"] = "quantile"
    quantile: float = Field(0.99, gt=0, le=1)
    sign: Literal["abs", "helpful_only"] = "abs"
    batch_size: int = Field(
        4, gt=0, le=65_536, description="sequences per forward+backward, <= 65536"
    )


class DistillConfig(_Strict):
    tau: float = Field(0.9, gt=0, le=1, description="fraction of total attribution to explain")
    cycles: int = Field(7, ge=0, le=1000, description="distillation cycles after cycle 0, <= 1000")
    core_mode: Literal["reselect", "accumulate"] = "reselect"
    max_core: int | None = Field(
        None, gt=0, le=2**24, description="optional cap on the core size (< sae.width)"
    )
    init_core: str | None = Field(
        None, description="run directory whose distilled core seeds cycle 0 (frozen)"
    )


class RayConfig(_Strict):
    enabled: bool = Field(True, description="false: every stage in this process, no Ray")
    address: str | None = Field(
        None, description="None: $RAY_ADDRESS or a local cluster (the REST service refuses it: "
        "the operator's --ray-address)"
    )
    num_workers: int = Field(
        1, ge=0, le=1024, description="Ray Train workers (0 = in the driver), <= 1024"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="<= 1024")
    activation_actors: int = Field(1, ge=1, le=1024, description="<= 1024")
    max_failures: int = Field(2, ge=0, le=100, description="<= 100")
    resource_wait_s: float = Field(
        300, ge=0, le=86_400,
        description="time an autoscaling cluster gets to provide missing workers (<= 1 day)",
    )


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    run_dir: str = "runs/dmsae"

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        if self.distill.max_core is not None and self.distill.max_core >= self.sae.width:
            raise ValueError(
                f"distill.max_core must be < sae.width={self.sae.width} "
                f"(got {self.distill.max_core}): the SAE needs non-core latents"
            )
        if self.data.context_length < 2:
            raise ValueError("data.context_length must be >= 2")
        for field, value in (("run_dir", self.run_dir), ("distill.init_core",
                                                          self.distill.init_core)):
            if value is not None and is_uri(value):
                raise ValueError(
                    f"{field}: {value!r} is a URI; run directories must be paths every node "
                    "sees (a shared or mounted filesystem, see cluster/README.md); "
                    "data.activation_cache takes s3:// and gs:// URIs"
                )
        cache = self.data.activation_cache
        if cache is not None and not self.ray.enabled and is_uri(cache) \
                and not cache.startswith("file://"):
            raise ValueError(
                f"data.activation_cache: {cache!r} needs ray.enabled: true (without Ray the "
                "cache must be a local directory)"
            )
        return self


def embedded_default() -> RunConfig:
    """stories15M, its own sampled corpus, a 2048-latent SAE: a few cycles in minutes on CPU."""
    return RunConfig.model_validate(
        {
            "model": {"name": EMBEDDED_MODEL, "layer": 3, "dtype": "float32"},
            "data": {
                "dataset": EMBEDDED_CORPUS,
                "context_length": 256,
                "attribution_sequences": 16,
                "eval_sequences": 8,
                "llm_batch_size": 16,
                "cache_activations": True,
            },
            "sae": {
                "width": 2048,
                # Calibrated (docs/calibration.md): k 64, a batchtopk core and lr 3e-3 reach
                # FVE >= 0.8 every cycle with core L0 ~5-7; a relu core took 44-77 of k = 64.
                "k": 64,
                "core_activation": "batchtopk",
                "dead_tokens": 100_000,
                "threshold_start_step": 20,
                # 0.999 averages over ~1000 steps; a 128-step cycle needs a shorter memory.
                "threshold_beta": 0.95,
                "norm_batches": 10,
            },
            "train": {
                "tokens_per_cycle": 262_144,
                "batch_size": 1024,
                "lr": 3e-3,
                "warmup_steps": 10,
                "log_every": 64,
                "checkpoint_every": 128,
            },
            "attribution": {"batch_size": 8},
            "distill": {"cycles": 3},
            "run_dir": "runs/embedded",
        }
    )


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `dmsae run --help`)"
        lines.append(f"  {field}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'sae.k=32' -> ('sae.k', 32); the value is parsed as YAML so lists and numbers work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML or JSON config file, unvalidated."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse {p}: {err}") from None
    if not isinstance(data, dict | None):
        raise ConfigError(f"{p} must hold a mapping of sections")
    return data or {}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Config file (YAML or JSON) on top of ``base`` (the embedded default when no file is
    given, the paper defaults otherwise), then ``section.key=value`` overrides."""
    if path is not None:
        data = read_config_file(path)
        data.pop("sweep", None)  # read by `dmsae sweep`, not part of a single run
    else:
        data = (base or embedded_default()).model_dump(mode="json")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(data, key, value)
    return validate(data)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")


def check_layer(cfg: RunConfig, num_layers: int) -> None:
    """The depth is known only once the model config is read; still before any work."""
    if cfg.model.layer >= num_layers:
        raise ConfigError(
            f"invalid config:\n  model.layer: must be in [0, {num_layers - 1}] for "
            f"{cfg.model.name} ({num_layers} decoder layers), got {cfg.model.layer}"
        )
