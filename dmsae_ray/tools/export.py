"""``dmsae export``: a run's SAEs as SAELens folders, optionally laid out for the HF hub.

Each folder holds ``cfg.json`` + ``sae_weights.safetensors`` (``jumprelu``, threshold and norm
factor folded in: it works on raw ``blocks.L.hook_resid_post`` activations) and
``sparsity.safetensors`` (log10 firing density + 1e-10 from an eval pass on the run's held-out
eval blocks). ``--hub-layout`` writes one subfolder per SAE id plus a model card, so the folder
can be pushed as is and loaded with ``SAE.from_pretrained("<user>/<repo>", "<sae id>")``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import ConfigError, RunConfig, validate
from dmsae_ray.jsonio import read_json
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.run.runfiles import CycleSummary
from dmsae_ray.run.saelens import write_saelens, write_sparsity

# Scalars copied into the cfg metadata and the model card.
CARD_METRICS = ("l0", "core_l0", "fve", "explained_variance", "ce_loss_score", "kl_div_score")


@dataclass
class Exported:
    sae_id: str
    cycle: int
    path: Path
    width: int
    k: int
    core_size: int
    metrics: dict = field(default_factory=dict)


def load_run(run_dir: str | Path) -> tuple[RunDir, RunConfig, dict]:
    rd = RunDir(run_dir)
    if not rd.config_path.is_file():
        raise ConfigError(f"{rd.root} is not a run directory (no config.json)")
    return rd, validate(read_json(rd.config_path)), rd.load_state()


def resolve_cycles(state: dict, spec: str | int) -> list[int]:
    """``final`` (the last committed cycle), ``all``, or a cycle number."""
    n = len(state["cycles"])
    if n == 0:
        raise ConfigError("the run has no committed cycle yet")
    if spec == "final":
        return [n - 1]
    if spec == "all":
        return list(range(n))
    try:
        cycle = int(spec)
    except ValueError:
        raise ConfigError(f"--cycle must be a number, 'final' or 'all' (got {spec!r})") from None
    if not 0 <= cycle < n:
        raise ConfigError(f"--cycle {cycle}: the run has cycles 0..{n - 1}")
    return [cycle]


def sae_id_of(cfg: RunConfig, sae: MatryoshkaBatchTopKSAE, cycle: int) -> str:
    return f"layer_{cfg.model.layer}_width_{sae.width}_k{sae.k}_cycle{cycle}"


def core_ids_of(sae: MatryoshkaBatchTopKSAE) -> list[list[int]]:
    return [
        [int(a), int(b)]
        for a, b in zip(
            sae.origin_cycle[: sae.c].tolist(), sae.origin_index[: sae.c].tolist(), strict=True
        )
    ]


class _Densities:
    """Loads the LM and the held-out eval blocks once, on first use."""

    def __init__(self, cfg: RunConfig, norm_factor: float) -> None:
        self.cfg, self.norm_factor = cfg, norm_factor
        self.model = self.data = None

    def __call__(self, sae: MatryoshkaBatchTopKSAE):
        from dmsae_ray.algo.evaluate import run_eval
        from dmsae_ray.model.data import load_token_data
        from dmsae_ray.model.lm import load_lm, load_tokenizer

        if self.model is None:
            self.model = load_lm(self.cfg.model)
            self.data = load_token_data(self.cfg.data, load_tokenizer(self.cfg.model))
        device = next(self.model.parameters()).device
        return run_eval(
            self.model,
            sae.to(device),
            self.data.eval,
            self.cfg.model.layer,
            self.norm_factor,
            self.data.specials,
            self.cfg.data.llm_batch_size,
        )


def export_run(
    run_dir: str | Path,
    out: str | Path,
    cycle: str | int = "final",
    hub_layout: bool = False,
    sparsity: bool = True,
    repo_id: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Exported]:
    rd, cfg, state = load_run(run_dir)
    cycles = resolve_cycles(state, cycle)
    out = Path(out)
    norm_factor = float(state["norm_factor"])
    densities = _Densities(cfg, norm_factor) if sparsity else None
    nested = hub_layout or len(cycles) > 1  # one subfolder per SAE id
    done = []
    for c in cycles:
        sae = rd.load_sae(c).eval()
        sid = sae_id_of(cfg, sae, c)
        folder = out / sid if nested else out
        write_saelens(folder, sae, cfg, c, core_ids_of(sae), norm_factor)
        metrics_path = rd.cycle_dir(c) / "sae" / "metrics.json"
        # metrics.json is the cycle summary (less its seconds); the SAEBench metrics are its eval.
        metrics = (
            CycleSummary.from_dict(read_json(metrics_path)).eval if metrics_path.is_file() else {}
        )
        if densities is not None:
            metrics, density = densities(sae)  # fresh, with the current metric set
            write_sparsity(folder, density)
        _add_details(folder / "cfg.json", rd, c, metrics)
        done.append(Exported(sid, c, folder, sae.width, sae.k, sae.c, metrics))
        log(f"cycle {c} -> {folder}")
    if hub_layout:
        (out / "README.md").write_text(model_card(cfg, done, repo_id))
        log(f"model card -> {out / 'README.md'}")
    return done


def _add_details(cfg_path: Path, rd: RunDir, cycle: int, metrics: dict) -> None:
    """Provenance and the latents this SAE handed to the next cycle, in the free-form details."""
    data = json.loads(cfg_path.read_text())
    details = data["metadata"]["training_architecture_details"]
    details["source_run"] = str(rd.root.resolve())
    core_path = rd.cycle_dir(cycle) / "core.json"
    if core_path.is_file():
        core = read_json(core_path)
        details["selected_core"] = {"indices": core["indices"], "ids": core["ids"]}
    details["eval"] = {k: metrics[k] for k in CARD_METRICS if k in metrics}
    cfg_path.write_text(json.dumps(data, indent=2) + "\n")


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


def model_card(cfg: RunConfig, saes: list[Exported], repo_id: str | None = None) -> str:
    # Only a hub id makes sense as base_model; a local path would leak a machine's layout.
    hub_model = "/" in cfg.model.name and not Path(cfg.model.name).expanduser().exists()
    name = cfg.model.name if hub_model else Path(cfg.model.name).name
    front = ["---", "library_name: saelens", "tags:"]
    front += [f"- {t}" for t in ("sparse-autoencoder", "saelens", "dmsae", "matryoshka")]
    if hub_model:
        front.append(f"base_model: {name}")
    front.append("---")
    rows = [
        "| SAE id | cycle | width | k | core size | L0 | core L0 | explained variance "
        "| CE loss recovered | KL score |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in saes:
        m = [_fmt(s.metrics.get(k)) for k in CARD_METRICS]
        rows.append(
            f"| `{s.sae_id}` | {s.cycle} | {s.width} | {s.k} | {s.core_size} | "
            + " | ".join(m)
            + " |"
        )
    repo = repo_id or "<hf-user>/<repo>"
    first = saes[0].sae_id if saes else "<sae id>"
    body = f"""
# Distilled Matryoshka SAEs: {name}, layer {cfg.model.layer}

Sparse autoencoders trained with dmsae-ray (Distilled Matryoshka Sparse
Autoencoders) on the residual stream after decoder layer {cfg.model.layer}
(`blocks.{cfg.model.layer}.hook_resid_post`, `model.layers.{cfg.model.layer}` in Hugging Face).
Each folder is one SAE in SAELens format: a Matryoshka BatchTopK SAE saved as `jumprelu`, with
the learned BatchTopK threshold and the activation norm factor folded in, so it takes raw
activations. The first `core size` latents are the frozen distilled core (plain ReLU, threshold
0); the reported L0 includes them. `training_architecture_details` in each `cfg.json` lists the
Matryoshka group widths, the persistent ids of the core latents and the latents this SAE's
cycle selected. Metrics are SAEBench core metrics on held-out tokens
({cfg.data.eval_sequences} sequences of {cfg.data.context_length} tokens).

{chr(10).join(rows)}

## Loading

```python
from sae_lens import SAE

sae = SAE.from_pretrained("{repo}", "{first}")
```
"""
    return "\n".join(front) + "\n" + body
