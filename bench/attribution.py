"""Attribution (gradient x activation of the candidates on next-token loss) per candidate-set size.

The candidates are the most nested latents (core + first Matryoshka group). The SAE width is
fixed and the first group's share is varied, so only the candidate count changes. One fresh
subprocess per size runs ``attribution.attribute`` end to end (splice mode, exact 0.99
quantile, i.e. every token's scores are kept) on stories15M and reports tokens/s and the peak
RSS above the level after the model, tokens and SAE were loaded. The kept scores alone are
tokens x candidates x 4 bytes.

    DMSAE_CACHE=/tmp/dm_cache python bench/attribution.py [--sizes 128 512 2048 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MemoryPeak, fmt_table, median, print_header, run_worker  # noqa: E402


def worker(spec: dict) -> dict:
    from dmsae_ray.algo.attribution import attribute
    from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
    from dmsae_ray.config import AttributionConfig, ModelConfig
    from dmsae_ray.model.lm import layer_activations, load_lm

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    layer, width, n = spec["layer"], spec["width"], spec["candidates"]
    specials = [0, 1, 2]  # stories15M: <unk> (pad), <s>, </s>
    mcfg = ModelConfig(name="stories15m", layer=layer, dtype="float32")
    model = load_lm(mcfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, model.config.vocab_size, (spec["blocks"], spec["seq"]), generator=gen)
    blocks[:, 0] = 1  # BOS
    d = model.config.hidden_size
    sae = MatryoshkaBatchTopKSAE(d, width, spec["k"], 0, group_fractions=[n / width, 1 - n / width])
    assert sae.nested_width == n
    h = layer_activations(model, blocks[:4], layer).reshape(-1, d)
    norm_factor = float(h.pow(2).sum(-1).mean().sqrt())
    with torch.no_grad():  # a trained SAE encodes with its JumpReLU threshold
        sae.threshold.copy_(sae.encode_train(h / norm_factor).min_selected)
    cfg = AttributionConfig(batch_size=spec["batch"])
    mem = MemoryPeak("cpu")
    times = []
    for _ in range(spec["repeats"]):
        mem.start()
        t0 = time.perf_counter()
        scores = attribute(model, sae, blocks, layer, norm_factor, specials, cfg, log=None)
        times.append(time.perf_counter() - t0)
        peak = mem.peak_delta_mb()
    assert scores.shape == (n,)
    tokens = int((~torch.isin(blocks, torch.tensor(specials))).sum())  # the scored positions
    return {"secs": median(times), "tokens": tokens, "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--width", type=int, default=65_536, help="SAE width (fixed)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=32, help="held-out sequences scored")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="sequences per forward+backward")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print_header("Attribution per candidate-set size (stories15M, splice, exact quantile)")
    if args.threads:
        print(f"threads per run: {args.threads} (--threads)\n")
    rows = []
    for n in args.sizes:
        spec = dict(
            candidates=n, width=args.width, k=args.k, layer=args.layer, blocks=args.blocks,
            seq=args.seq, batch=args.batch, repeats=args.repeats, threads=args.threads,
        )  # fmt: skip
        out = run_worker(Path(__file__), spec, timeout=3600)
        if "error" in out:
            print(f"candidates {n}: {out['error']}")
            continue
        scores_mb = out["tokens"] * n * 4 / 2**20
        rows.append(
            [
                str(n),
                f"{out['tokens'] / out['secs']:,.0f}",
                f"{out['secs']:.2f}",
                f"{out['peak_mb']:.0f}",
                f"{scores_mb:.0f}",
            ]
        )
        print(f"candidates {n}: {rows[-1][1]} tokens/s, peak +{rows[-1][3]} MB", flush=True)
    print()
    header = ["candidates", "tokens/s", "seconds", "peak RSS MB", "kept scores MB"]
    print(fmt_table(header, rows))


if __name__ == "__main__":
    main()
