"""A tiny random Gemma-2 (the production architecture) and a byte-level BPE on a generated
corpus: builds in about a second and needs no network."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Ann", "Sam"]
THINGS = ["ball", "cat", "tree", "boat", "cake", "dog", "kite", "book", "star", "hat"]
VERBS = ["saw", "found", "liked", "lost", "made", "took", "gave", "wanted"]
ADJ = ["big", "red", "small", "happy", "blue", "old", "new", "funny"]


def story(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(4, 9)):
        a, b = rng.sample(NAMES, 2)
        out.append(
            f"{a} {rng.choice(VERBS)} a {rng.choice(ADJ)} {rng.choice(THINGS)} and "
            f"{b} was {rng.choice(ADJ)}."
        )
    return " ".join(out)


def write_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": story(rng)}) + "\n")
    return path


def build_tiny_model(out_dir: Path, corpus: Path, n_layers: int = 4, hidden: int = 64) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
