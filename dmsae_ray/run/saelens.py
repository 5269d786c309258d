"""SAELens-loadable artefacts (the format SAELens's ``SAE.load_from_disk`` reads).

A BatchTopK/Matryoshka SAE is saved as ``jumprelu``: the learned global threshold becomes a
per-latent threshold, core latents get threshold 0 when they are a plain ReLU
(``core_activation: relu``) and the shared threshold when they compete in BatchTopK, and the
activation norm factor is folded into the biases and thresholds so the saved SAE works on raw
activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import RunConfig

SAE_LENS_VERSION = "6.54.12"


def saelens_tensors(sae: MatryoshkaBatchTopKSAE, norm_factor: float) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=1)  # 1 by construction; folded anyway for safety
        threshold = torch.full((sae.width,), max(float(sae.threshold), 0.0))
        if not sae.core_in_topk:
            threshold[: sae.c] = 0.0
        return {
            "W_enc": (sae.W_enc * norms[None]).contiguous().float(),
            "b_enc": (sae.b_enc * norms * norm_factor).contiguous().float(),
            "W_dec": (sae.W_dec / norms[:, None]).contiguous().float(),
            "b_dec": (sae.b_dec * norm_factor).contiguous().float(),
            "threshold": (threshold * norms * norm_factor).contiguous().float(),
        }


def saelens_cfg(
    sae: MatryoshkaBatchTopKSAE, cfg: RunConfig, cycle: int, core_ids: list, norm_factor: float
) -> dict:
    layer = cfg.model.layer
    return {
        "architecture": "jumprelu",
        "d_in": sae.d_in,
        "d_sae": sae.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": SAE_LENS_VERSION,
            "model_name": cfg.model.name,
            "model_class_name": "AutoModelForCausalLM",
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hf_hook_name": f"model.layers.{layer}",
            "hook_head_index": None,
            "context_size": cfg.data.context_length,
            "prepend_bos": True,
            "dataset_path": cfg.data.dataset,
            "seqpos_slice": [None],
            "model_from_pretrained_kwargs": {},
            "exclude_special_tokens": True,
            "neuronpedia_id": None,
            "training_architecture": "dmsae_matryoshka_batchtopk",
            "training_architecture_details": {
                "cycle": cycle,
                "k": sae.k,
                "core_size": sae.c,
                "core_ids": [list(i) for i in core_ids],
                "matryoshka_group_sizes": sae.groups,
                "matryoshka_widths": sae.group_ends,
                "l0_budget": sae.l0_budget,
                "core_activation": sae.core_activation,
                "norm_factor_folded": norm_factor,
                "threshold_normalised": float(sae.threshold),
            },
        },
    }


def write_saelens(
    out_dir: Path,
    sae: MatryoshkaBatchTopKSAE,
    cfg: RunConfig,
    cycle: int,
    core_ids: list,
    norm_factor: float,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(saelens_tensors(sae, norm_factor), str(out_dir / "sae_weights.safetensors"))
    cfg_json = saelens_cfg(sae, cfg, cycle, core_ids, norm_factor)
    (out_dir / "cfg.json").write_text(json.dumps(cfg_json, indent=2) + "\n")


def write_sparsity(out_dir: Path, density: torch.Tensor) -> None:
    """``sparsity.safetensors``: log10 of each latent's firing frequency + 1e-10 (SAELens)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log10 = torch.log10(density.detach().float().cpu() + 1e-10).contiguous()
    save_file({"sparsity": log10}, str(out_dir / "sparsity.safetensors"))
