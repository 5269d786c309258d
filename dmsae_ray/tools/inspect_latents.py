"""``dmsae inspect``: the top-activating token contexts of latents, so a person can read what a
core feature means.

Runs the LM on the run's held-out blocks (attribution and/or eval: tokens the SAEs never trained
on), encodes the hooked activations with the cycle's SAE at its inference threshold, and keeps
the ``top`` highest activations per latent with a window of decoded tokens around each. A latent
is named by its index in that cycle's SAE (``12``) or by its persistent id ``cycle:index``
(``0:37`` = latent 37 of cycle 0, wherever the core has carried it since).

``python -m dmsae_ray.tools.inspect_latents RUN_DIR CYCLE`` computes the contexts of the core a
cycle selected once and caches them as ``cycles/NNN/inspect.json`` (``write_cache``): the web UI's
core browser (api/ui.py) runs it in a subprocess, so the service process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from dmsae_ray.algo.core import selection_counts
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import ConfigError
from dmsae_ray.model.data import valid_mask
from dmsae_ray.model.lm import layer_activations
from dmsae_ray.tools.export import load_run, resolve_cycles

SOURCES = ("heldout", "eval", "attribution")


def parse_latent(spec: str, sae: MatryoshkaBatchTopKSAE) -> int:
    """An index, or a persistent id ``cycle:index`` looked up among this SAE's latents."""
    try:
        parts = [int(p) for p in spec.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ConfigError(f"--latent {spec!r}: use an index or a persistent id cycle:index")
    if len(parts) == 2:
        hit = (sae.origin_cycle == parts[0]) & (sae.origin_index == parts[1])
        found = torch.nonzero(hit).flatten()
        if not len(found):
            raise ConfigError(
                f"latent id {spec} is not in this cycle's SAE (neither its own latent nor "
                f"carried in its core); try --cycle {parts[0]}"
            )
        return int(found[0])
    if not 0 <= parts[0] < sae.width:
        raise ConfigError(f"--latent {parts[0]}: the SAE has latents 0..{sae.width - 1}")
    return parts[0]


@torch.no_grad()
def encode_columns(sae: MatryoshkaBatchTopKSAE, x: Tensor, latents: list[int]) -> Tensor:
    """Inference codes of only the chosen latents [n, len(latents)] (the full [n, K] matrix
    would not fit for a wide SAE on a long batch)."""
    if float(sae.threshold) < 0:  # no threshold learned yet: BatchTopK needs every latent
        return sae.encode(x)[:, latents]
    idx = torch.tensor(latents, device=x.device)
    pre = (x - sae.b_dec) @ sae.W_enc[:, idx] + sae.b_enc[idx]
    post = torch.relu(pre)
    gate = post > sae.threshold
    if not sae.core_in_topk:
        gate |= (idx < sae.c)[None]  # a relu core is exempt from the threshold
    return post * gate


@torch.no_grad()
def top_activations(
    model: nn.Module,
    sae: MatryoshkaBatchTopKSAE,
    blocks: Tensor,
    layer: int,
    norm_factor: float,
    specials: list[int],
    latents: list[int],
    top: int = 10,
    batch_size: int = 8,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per latent: top values [n, top], their (block, position) [n, top, 2], the number of
    valid tokens it fired on [n], and the number of valid tokens seen."""
    device = next(model.parameters()).device
    n = len(latents)
    vals = torch.empty(0, n)
    locs = torch.empty(0, n, 2, dtype=torch.long)
    fired = torch.zeros(n, dtype=torch.long)
    seen = 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        b, t = ids.shape
        valid = valid_mask(ids, specials)
        h = layer_activations(model, ids, layer).float() / norm_factor
        f = encode_columns(sae, h.reshape(b * t, -1), latents).cpu()
        f[~valid.flatten().cpu()] = 0  # BOS/pad are never scored
        fired += (f > 0).sum(0)
        seen += int(valid.sum())
        bv, bi = f.topk(min(top, b * t), dim=0)  # this batch's best rows per latent [top, n]
        vals = torch.cat([vals, bv])
        locs = torch.cat([locs, torch.stack([start + bi // t, bi % t], -1)])
        keep = vals.topk(min(top, vals.shape[0]), dim=0).indices
        vals = vals.gather(0, keep)
        locs = locs.gather(0, keep[..., None].expand(-1, -1, 2))
    return vals.T, locs.transpose(0, 1), fired, seen


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).replace("\n", "⏎")


def context(tokenizer, block: Tensor, pos: int, window: int) -> dict:
    """The token at ``pos`` with ``window`` tokens each side, decoded as running text.

    Decoding growing prefixes, not single tokens, keeps the spaces a SentencePiece tokenizer
    drops at the start of a decoded piece.
    """
    lo, hi = max(0, pos - window), min(len(block), pos + window + 1)
    ids = block[lo:hi].tolist()
    at = pos - lo
    before = _decode(tokenizer, ids[:at])
    upto = _decode(tokenizer, ids[: at + 1])
    full = _decode(tokenizer, ids)
    if upto.startswith(before) and full.startswith(upto):
        token, after = upto[len(before) :], full[len(upto) :]
    else:  # a merge across the boundary: fall back to token-by-token pieces
        token, after = _decode(tokenizer, ids[at : at + 1]), _decode(tokenizer, ids[at + 1 :])
    return {"token": token, "before": before, "after": after, "text": f"{before}[[{token}]]{after}"}


def inspect_latents(
    run_dir: str | Path,
    latents: list[str] | None = None,
    cycle: str | int = "final",
    top: int = 10,
    window: int = 8,
    source: str = "heldout",
) -> list[dict]:
    """Top contexts of each latent; without ``latents``, of the core selected from the cycle
    (the distilled core for the final cycle)."""
    from dmsae_ray.model.data import load_token_data
    from dmsae_ray.model.lm import load_lm, load_tokenizer

    if source not in SOURCES:
        raise ConfigError(f"--source must be one of {SOURCES} (got {source!r})")
    rd, cfg, state = load_run(run_dir)
    cycles = resolve_cycles(state, cycle)
    if len(cycles) != 1:
        raise ConfigError("--cycle must name one cycle (a number or final)")
    c = cycles[0]
    sae = rd.load_sae(c).eval()
    selected = rd.load_core(c)["indices"]
    indices = [parse_latent(s, sae) for s in latents] if latents else list(selected)
    if not indices:
        raise ConfigError(f"cycle {c} selected no latent; name one with --latent")
    tokenizer = load_tokenizer(cfg.model)
    model = load_lm(cfg.model)
    sae.to(next(model.parameters()).device)
    data = load_token_data(cfg.data, tokenizer)
    parts = {"eval": [data.eval], "attribution": [data.attribution]}
    blocks = torch.cat(parts.get(source, [data.attribution, data.eval]))
    vals, locs, fired, seen = top_activations(
        model,
        sae,
        blocks,
        cfg.model.layer,
        float(state["norm_factor"]),
        data.specials,
        indices,
        top,
        cfg.data.llm_batch_size,
    )
    history = [[tuple(i) for i in rd.load_core(k)["ids"]] for k in range(len(state["cycles"]))]
    counts = selection_counts(history)
    out = []
    for j, index in enumerate(indices):
        lid = (int(sae.origin_cycle[index]), int(sae.origin_index[index]))
        hits = [
            {"value": float(v), "block": int(b), "position": int(p)}
            | context(tokenizer, blocks[int(b)], int(p), window)
            for v, (b, p) in zip(vals[j].tolist(), locs[j].tolist(), strict=True)
            if v > 0
        ]
        out.append(
            {
                "cycle": c,
                "index": index,
                "id": f"{lid[0]}:{lid[1]}",
                "frozen_core": index < sae.c,
                "selected": index in selected,
                "times_selected": counts.get(lid, 0),
                "density": int(fired[j]) / max(seen, 1),
                "tokens": seen,
                "top": hits,
            }
        )
    return out


def format_latents(results: list[dict]) -> str:
    lines = []
    for r in results:
        role = "frozen core latent" if r["frozen_core"] else "non-core latent"
        if r["selected"]:
            role += ", selected into the next core"
        lines.append(
            f"latent {r['index']} of cycle {r['cycle']} = id {r['id']} ({role}; selected in "
            f"{r['times_selected']} cycle(s)); fires on {100 * r['density']:.2f}% of "
            f"{r['tokens']:,} held-out tokens"
        )
        if not r["top"]:
            lines.append("  (never fires on these tokens)")
        for n, h in enumerate(r["top"], 1):
            lines.append(f"  {n:>3}. {h['value']:8.3f}  {h['text']}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the UI's cache

CACHE_FILE = "inspect.json"
CACHE_VERSION = 1
CACHE_DEFAULTS = {"top": 10, "window": 8, "source": "heldout"}


def cache_path(run_dir: str | Path, cycle: int) -> Path:
    """``cycles/NNN/inspect.json``: the contexts of the core cycle NNN selected."""
    return Path(run_dir) / "cycles" / f"{cycle:03d}" / CACHE_FILE


def cache_matches(data: object, cycle: int, params: dict | None = None) -> bool:
    """A cache file written for this cycle with these parameters by this format version."""
    want = CACHE_DEFAULTS | (params or {})
    return (
        isinstance(data, dict)
        and data.get("version") == CACHE_VERSION
        and data.get("cycle") == cycle
        and all(data.get(k) == v for k, v in want.items())
    )


def write_cache(run_dir: str | Path, cycle: int, **params) -> Path:
    """Compute the top contexts of every latent cycle ``cycle`` selected and write them,
    atomically, to ``cache_path``. Written into a committed cycle's directory, which nothing
    rewrites; an existing file with the same parameters is kept."""
    params = CACHE_DEFAULTS | params
    path = cache_path(run_dir, cycle)
    if not path.parent.is_dir():
        raise ConfigError(f"cycle {cycle} of {run_dir} is not committed")
    try:
        if cache_matches(json.loads(path.read_text()), cycle, params):
            return path
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    started = time.time()
    latents = inspect_latents(run_dir, None, cycle, params["top"], params["window"],
                              params["source"])
    data = {"version": CACHE_VERSION, "cycle": cycle, **params, "computed_at": time.time(),
            "seconds": round(time.time() - started, 2), "latents": latents}
    tmp = path.with_name(f".{CACHE_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dmsae_ray.tools.inspect_latents",
        description="cache the top contexts of the core a cycle selected in cycles/NNN/"
        f"{CACHE_FILE} (what the web UI's core browser shows)",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("cycle", type=int)
    p.add_argument("--top", type=int, default=CACHE_DEFAULTS["top"])
    p.add_argument("--window", type=int, default=CACHE_DEFAULTS["window"])
    p.add_argument("--source", default=CACHE_DEFAULTS["source"], choices=SOURCES)
    args = p.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:  # a server's helper: leave it some cores
        torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))
    try:
        path = write_cache(args.run_dir, args.cycle, top=args.top, window=args.window,
                           source=args.source)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
