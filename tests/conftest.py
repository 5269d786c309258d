from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import build_tiny_model, write_corpus  # noqa: E402

torch.set_num_threads(1)  # 2 cores shared with Ray workers: more threads only contend


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "corpus.jsonl")
    model = build_tiny_model(root / "model", corpus)
    return {"root": root, "corpus": corpus, "model": model}


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir["model"], attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_dir["model"])


def tiny_config(tiny_dir: dict[str, Path], run_dir: Path, **sections) -> dict:
    """A run config on the tiny model that trains in seconds."""
    cfg = {
        "model": {"name": str(tiny_dir["model"]), "layer": 1, "dtype": "float32"},
        "data": {
            "dataset": str(tiny_dir["corpus"]),
            "context_length": 64,
            "attribution_sequences": 8,
            "eval_sequences": 4,
            "llm_batch_size": 16,
            "cache_activations": True,
        },
        "sae": {
            "width": 256,
            "k": 8,
            "dead_tokens": 5000,
            "threshold_start_step": 5,
            "norm_batches": 2,
        },
        "train": {
            "tokens_per_cycle": 4096,
            "batch_size": 256,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 8,
        },
        "attribution": {"batch_size": 4},
        "distill": {"cycles": 2},
        "run_dir": str(run_dir),
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
