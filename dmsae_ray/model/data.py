"""Corpora to fixed-length token blocks.

Documents are tokenized without special tokens, joined with BOS between them, cut into chunks of
``context_length - 1`` and each chunk gets a leading BOS (SAELens ``prepend_bos``). The first
blocks of the stream are held out: ``attribution_sequences`` scored every cycle (always the same
tokens), then ``eval_sequences`` for metrics; training reads the rest, repeating a finite corpus.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from dmsae_ray.config import EMBEDDED_CORPUS, ConfigError, DataConfig, MissingInputError
from dmsae_ray.model.gemma3_model import GEMMA3_CORPUS, gemma3_corpus

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise MissingInputError(f"data.dataset: no {'/'.join(TEXT_SUFFIXES)} files in {path}")
    return files


def _texts_of_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        # Blank-line separated paragraphs are the documents of a plain text file.
        for doc in path.read_text(encoding="utf-8").split("\n\n"):
            if doc.strip():
                yield doc.strip()
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise ConfigError(f"data.text_field: {path}:{n} has no {text_field!r} key")
                    yield row[text_field]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ConfigError(f"data.text_field: {path} has no column {text_field!r}")
        yield from table.column(text_field).to_pylist()
    else:
        raise ValueError(f"data.dataset: unsupported file type {path.suffix} ({path})")


def resolve_dataset(cfg: DataConfig) -> str:
    if cfg.dataset == EMBEDDED_CORPUS:
        from dmsae_ray.model.default_model import default_corpus

        return str(default_corpus())
    if cfg.dataset == GEMMA3_CORPUS:
        return str(gemma3_corpus())
    return cfg.dataset


def iter_texts(cfg: DataConfig) -> Iterator[str]:
    source = resolve_dataset(cfg)
    path = Path(source).expanduser()
    if path.exists():
        for f in _local_files(path):
            yield from _texts_of_file(f, cfg.text_field)
        return
    if source.startswith((".", "/", "~")) or Path(source).suffix in TEXT_SUFFIXES:
        raise MissingInputError(f"data.dataset: no such file or directory: {source}")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=cfg.split, streaming=True)
    except Exception as err:  # the hub raises many types; all mean "cannot read it"
        raise MissingInputError(
            f"data.dataset: cannot open {source!r} (split {cfg.split!r}) as a local path or a "
            f"Hugging Face dataset: {err}"
        ) from None
    for row in ds:
        yield row[cfg.text_field]


def bos_id(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to separate documents")
    return int(tid)


def iter_blocks(texts: Iterator[str], tokenizer, context_length: int) -> Iterator[Tensor]:
    bos = bos_id(tokenizer)
    body = context_length - 1
    buf: list[int] = []
    for text in texts:
        buf.append(bos)
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buf) >= body:
            yield torch.tensor([bos, *buf[:body]], dtype=torch.long)
            buf = buf[body:]


def special_ids(tokenizer) -> list[int]:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def valid_mask(ids: Tensor, specials: list[int]) -> Tensor:
    """False at BOS/EOS/pad: those positions are neither trained on, scored, nor replaced."""
    return ~torch.isin(ids, torch.tensor(specials, device=ids.device))


@dataclass
class TokenData:
    attribution: Tensor  # [Na, T]
    eval: Tensor  # [Ne, T]
    train_blocks: Callable[[], Iterator[Tensor]]  # a fresh pass over the training blocks
    specials: list[int]


def load_token_data(cfg: DataConfig, tokenizer) -> TokenData:
    held = cfg.attribution_sequences + cfg.eval_sequences

    def blocks() -> Iterator[Tensor]:
        return iter_blocks(iter_texts(cfg), tokenizer, cfg.context_length)

    head = list(islice(blocks(), held + 1))
    if len(head) < held + 1:
        raise ConfigError(
            f"data.dataset: {cfg.dataset!r} gives only {len(head)} blocks of "
            f"{cfg.context_length} tokens; need {held} held out "
            f"(data.attribution_sequences + data.eval_sequences) plus training blocks"
        )

    def train_blocks() -> Iterator[Tensor]:
        return islice(blocks(), held, None)

    return TokenData(
        attribution=torch.stack(head[: cfg.attribution_sequences]),
        eval=torch.stack(head[cfg.attribution_sequences : held]),
        train_blocks=train_blocks,
        specials=special_ids(tokenizer),
    )
