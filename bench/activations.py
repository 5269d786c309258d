"""Activation generation: stop-after-layer fast path vs a full forward, in-process vs Ray Data.

1. stories15M (the embedded default, 6 layers, d=288) at layer 3: ``layer_activations`` (the
   forward stops inside a hook right after layer L) vs ``layer_activations_full`` (full forward
   with ``output_hidden_states``), plus ``block_activations`` (what training consumes: BOS/pad
   dropped, fp32 on the host).
2. A random Gemma-2 with 26 layers, hooked at layer 12 (the reference run's site), scaled
   down from gemma-2-2b by 1/4 in hidden size, MLP width, head dim *and* vocabulary, so the
   unembedding keeps the same share of a full forward as in gemma-2-2b (whose weights cannot be
   fetched here). Target: the fast path at least 2x a full forward.
3. ``--ray``: the same stories15M blocks through the Ray Data ``ActivationWorker`` actor pool
   vs in-process ``iter_activations`` (starts a local Ray; never stops anyone else's).

    DMSAE_CACHE=/tmp/dm_cache python bench/activations.py [--ray] [--no-gemma]
    python bench/activations.py --device cuda --no-stories15m --gemma-hidden 2304 \
        --gemma-vocab 256000 --gemma-seq 1024 --gemma-batch 8 --json out.json  # gemma-2-2b shape

On CUDA the models run in bf16 (``--dtype auto``, as ``model.dtype: auto`` does in a run) and
every timed call ends with a device synchronisation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, median, print_header  # noqa: E402

from dmsae_ray.config import ModelConfig, RunConfig  # noqa: E402
from dmsae_ray.model.lm import (  # noqa: E402
    layer_activations,
    layer_activations_full,
    load_lm,
    pick_dtype,
)
from dmsae_ray.run.buffer import block_activations, iter_activations  # noqa: E402


def random_blocks(n: int, seq: int, vocab: int, bos: int, seed: int = 0) -> torch.Tensor:
    """Token blocks like the training ones (BOS first); token identity does not change cost."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=gen)
    ids[:, 0] = bos
    return ids


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call, alternating the functions so load drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, lazy init
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)  # kernels are asynchronous: time their completion
            times[name].append(time.perf_counter() - t0)
    return {name: median(ts) for name, ts in times.items()}


def compare(model, ids: torch.Tensor, layer: int, specials: list[int], repeats: int) -> dict:
    device = next(model.parameters()).device
    ids = ids.to(device)
    fast = layer_activations(model, ids, layer)
    full = layer_activations_full(model, ids, layer)
    diff = float((fast.float() - full.float()).abs().max())
    fns = {
        "full forward (output_hidden_states)": lambda: layer_activations_full(model, ids, layer),
        "stop after layer (hook)": lambda: layer_activations(model, ids, layer),
        "block_activations (stop + mask + host fp32)": lambda: block_activations(
            model, ids, layer, specials
        ),
    }
    secs = interleaved(fns, repeats, device)
    return {"secs": secs, "tokens": ids.numel(), "max_abs_diff": diff}


def summary(title: str, res: dict) -> dict:
    """The JSON record of one model: tokens/s per path and the stop-after-layer speed-up."""
    secs, tokens = res["secs"], res["tokens"]
    full = secs["full forward (output_hidden_states)"]
    return {
        "model": title,
        "tokens": tokens,
        "tokens_per_s": {name: tokens / s for name, s in secs.items()},
        "stop_after_layer_speedup": full / secs["stop after layer (hook)"],
        "max_abs_diff": res["max_abs_diff"],
    }


def report(title: str, res: dict) -> list[list[str]]:
    secs, tokens = res["secs"], res["tokens"]
    full = secs["full forward (output_hidden_states)"]
    rows = []
    for name, s in secs.items():
        rows.append([title, name, f"{tokens / s:,.0f}", f"{s * 1e3:.0f}", f"{full / s:.2f}x"])
    return rows


def gemma(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=args.gemma_vocab,
        hidden_size=args.gemma_hidden,
        intermediate_size=4 * args.gemma_hidden,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.gemma_hidden * 256 // 2304,  # gemma-2-2b: 8 heads of 256 at d=2304
        max_position_embeddings=max(8192, args.gemma_seq),
        attn_implementation="eager",  # the config default: Gemma-2's soft-capping needs it
    )
    torch.manual_seed(0)
    with torch.device(device):  # built in place: the full-size model's CPU init takes minutes
        model = Gemma2ForCausalLM(cfg)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg


def ray_section(args: argparse.Namespace, model, specials: list[int], bos: int) -> list[list[str]]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from dmsae_ray.distributed.activations import activation_dataset, write_token_blocks

    n_blocks = args.ray_blocks
    blocks = random_blocks(n_blocks, args.seq, model.config.vocab_size, bos, seed=1)
    cfg = RunConfig.model_validate(
        {
            "model": {"name": "stories15m", "layer": args.layer, "dtype": "float32"},
            "data": {"llm_batch_size": args.batch, "context_length": args.seq},
            "ray": {"activation_actors": args.actors},
        }
    )
    runs: list[tuple[int, float]] = []  # (rows, seconds) per Ray pass
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n_in = sum(
            len(a) for a in iter_activations(model, iter(blocks), args.layer, specials, args.batch)
        )
        in_proc = time.perf_counter() - t0
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir="/tmp/rt_bench")
        try:
            # Two sizes: every pass starts its actors and loads the model again, so the
            # difference between them is the streaming rate and the intercept the start-up.
            for n in (n_blocks // 4, n_blocks):
                tokens_dir = Path(tmp) / f"tokens-{n}"
                write_token_blocks(iter(blocks[:n]), tokens_dir, n, log=lambda _: None)
                ds = activation_dataset(cfg, tokens_dir, specials)
                t0 = time.perf_counter()
                rows = sum(len(b["x"]) for b in ds.iter_batches(batch_format="numpy"))
                runs.append((rows, time.perf_counter() - t0))
        finally:
            ray.shutdown()
    (r1, s1), (r2, s2) = runs
    rate = (r2 - r1) / max(s2 - s1, 1e-9)
    startup = max(0.0, s2 - r2 / rate)
    return [
        [f"in-process iter_activations, {n_in} tokens", f"{n_in / in_proc:,.0f}", "-"],
        [f"Ray Data, <= {args.actors} actors, {r1} tokens", f"{r1 / s1:,.0f}", f"{s1:.1f}"],
        [f"Ray Data, <= {args.actors} actors, {r2} tokens", f"{r2 / s2:,.0f}", f"{s2:.1f}"],
        [f"Ray Data streaming rate (start-up {startup:.1f} s excluded)", f"{rate:,.0f}", "-"],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layer", type=int, default=3, help="stories15M layer (of 6)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (stories15M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-gemma", action="store_true")
    ap.add_argument("--gemma-hidden", type=int, default=576, help="gemma-2-2b: 2304")
    ap.add_argument("--gemma-vocab", type=int, default=64_000, help="gemma-2-2b: 256000")
    ap.add_argument("--gemma-seq", type=int, default=512)
    ap.add_argument("--gemma-batch", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also the Ray Data actor pool")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--ray-blocks", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the Ray section stays on CPU)")
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="LM dtype; auto: bf16 on CUDA, fp32 on CPU (as model.dtype: auto)",
    )
    ap.add_argument(
        "--no-stories15m",
        action="store_true",
        help="skip stories15M (it needs the model in $DMSAE_CACHE or a download)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = pick_dtype(args.dtype, device)
    print_header(
        f"Activation generation (tokens/s, {str(dtype).removeprefix('torch.')})", args.device
    )

    rows: list[list[str]] = []
    results: list[dict] = []
    model = None
    bos, specials = 1, [0, 1, 2]  # stories15M: <unk> (pad), <s>, </s>
    if not args.no_stories15m:
        mcfg = ModelConfig(name="stories15m", layer=args.layer, dtype=args.dtype)
        model = load_lm(mcfg, device)
        ids = random_blocks(args.batch, args.seq, model.config.vocab_size, bos)
        title = f"stories15M layer {args.layer}/6"
        res = compare(model, ids, args.layer, specials, args.repeats)
        rows += report(title, res)
        results.append(summary(title, res))
    if not args.no_gemma:
        g, gcfg = gemma(args, device, dtype)
        gids = random_blocks(args.gemma_batch, args.gemma_seq, gcfg.vocab_size, 2)
        res = compare(g, gids, 12, [0, 1, 2], args.repeats)
        title = f"random Gemma-2 (26 layers, d={gcfg.hidden_size}) layer 12"
        rows += report(title, res)
        results.append(summary(title, res))
        print(f"gemma max |fast - full| = {res['max_abs_diff']:.2e}")
        del g
    header = ["model", "path", "tokens/s", "ms/batch", "vs full"]
    print(fmt_table(header, rows))
    if args.json:
        meta = {"device": args.device, "dtype": str(dtype).removeprefix("torch.")}
        args.json.write_text(json.dumps({**meta, "models": results}, indent=1))
    if args.ray:
        if model is None:
            raise SystemExit("--ray needs stories15M (drop --no-stories15m)")
        if device.type != "cpu":
            model = load_lm(
                ModelConfig(name="stories15m", layer=args.layer, dtype="float32"),
                torch.device("cpu"),
            )
        print()
        ray_rows = ray_section(args, model, specials, bos)
        print(fmt_table(["pipeline (stories15M)", "tokens/s", "seconds"], ray_rows))


if __name__ == "__main__":
    main()
