"""``dmsae report``: a run directory as ``report/summary.md`` plus PNG plots.

Answers the paper's two claims from the run's own files: the core is selected again and again
(core size, Jaccard and origin cycle of the core per cycle, selection counts of the final core:
the "core latent origins" view), and it transfers (metrics vs L0 for distilled, baseline and
random core, when ``dmsae transfer`` has written a table for the run). Plots use matplotlib's
object API with the Agg canvas, so nothing global (pyplot state, the backend) is touched.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dmsae_ray.algo.core import selection_counts
from dmsae_ray.config import ConfigError
from dmsae_ray.jsonio import read_json
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.run.runfiles import CycleSummary, read_cycles
from dmsae_ray.run.sweep_plan import PLOT_CORE, PLOT_JACCARD
from dmsae_ray.tools import compare
from dmsae_ray.tools.transfer import read_table

CYCLE_METRICS = (
    ("l0", "L0 (total)"),
    ("fve", "fraction of variance explained"),
    ("ce_loss_score", "CE loss recovered"),
    ("kl_div_score", "KL score"),
)
# Every SAEBench core metric the transfer table holds, against measured L0.
TRANSFER_METRICS = (
    ("fve", "fraction of variance explained"),
    ("explained_variance", "explained variance (SAEBench)"),
    ("mse", "MSE (raw scale)"),
    ("cossim", "cosine similarity"),
    ("l2_ratio", "L2 ratio"),
    ("relative_reconstruction_bias", "relative reconstruction bias"),
    ("ce_loss_score", "CE loss recovered"),
    ("kl_div_score", "KL score"),
    ("frac_alive", "fraction alive"),
    ("freq_over_10_percent", "fraction firing on >10% of tokens"),
    ("average_max_encoder_cosine_sim", "avg max encoder cosine sim"),
    ("average_max_decoder_cosine_sim", "avg max decoder cosine sim"),
)
VARIANT_STYLE = {"distilled": "C0o-", "baseline": "C1s--", "random": "C2^:"}


class RunData:
    """What the report needs from a run directory, read once."""

    def __init__(self, run_dir: str | Path) -> None:
        self.rd = RunDir(run_dir)
        if not self.rd.config_path.is_file():
            raise ConfigError(f"{self.rd.root} is not a run directory (no config.json)")
        self.config = read_json(self.rd.config_path)
        self.state = self.rd.load_state()
        self.cycles: list[CycleSummary] = read_cycles(self.state)
        if not self.cycles:
            raise ConfigError(f"{self.rd.root} has no committed cycle yet")
        # Each cycle's selected core, by persistent id (origin cycle, index in that cycle).
        self.history = [
            [tuple(i) for i in self.rd.load_core(c)["ids"]] for c in range(len(self.cycles))
        ]
        core_json = self.rd.core_dir / "core.json"
        self.distilled = read_json(core_json) if core_json.is_file() else None

    def final_core_densities(self) -> list[float] | None:
        """Firing density of each final-core latent in the SAE it was selected from (None for
        runs written before densities were recorded)."""
        return self.rd.load_core(len(self.cycles) - 1).get("densities")

    def final_core(self) -> tuple[list[tuple[int, int]], list[int], list[float]]:
        """ids, selection counts and scores of the final core (the last committed cycle's
        selection, which is the distilled core once the run has completed)."""
        last = self.rd.load_core(len(self.cycles) - 1)
        ids = [tuple(i) for i in last["ids"]]
        counts = selection_counts(self.history)
        return ids, [counts[i] for i in ids], list(last["scores"])


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_core_size(data: RunData, path: Path) -> Path:
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    xs = [s.cycle for s in data.cycles]
    ax.plot(xs, [s.core_size for s in data.cycles], "o-", label="selected (out)")
    ax.plot(xs, [s.core_in for s in data.cycles], "s--", alpha=0.6, label="frozen (in)")
    ax.set(xlabel="cycle", ylabel="core size", title="Core size per cycle")
    ax.set_xticks(xs)
    ax.legend()
    return _save(fig, path)


def plot_jaccard(data: RunData, path: Path) -> Path:
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    pts = [(s.cycle, s.jaccard) for s in data.cycles if s.jaccard is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), "o-")
        ax.set_xticks([p[0] for p in pts])
        ax.set_ylim(0, 1.05)
    else:
        _empty(ax, "cycle 0 only: no previous core to compare")
    ax.set(xlabel="cycle", ylabel="Jaccard(C(t), C(t-1))", title="Core stability")
    return _save(fig, path)


def plot_core_origins(data: RunData, path: Path) -> Path:
    """The final core by origin cycle and by how many cycles selected each latent."""
    ids, counts, _ = data.final_core()
    n_cycles = len(data.cycles)
    fig = Figure(figsize=(9, 3.4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    by_origin = Counter(i[0] for i in ids)
    by_count = Counter(counts)
    origins = list(range(n_cycles))
    ax1.bar(origins, [by_origin.get(c, 0) for c in origins], color="C0")
    ax1.set(xlabel="origin cycle", ylabel="final core latents", title="Final core: origin cycle")
    ax1.set_xticks(origins)
    times = list(range(1, n_cycles + 1))
    ax2.bar(times, [by_count.get(t, 0) for t in times], color="C2")
    ax2.set(
        xlabel="cycles that selected it",
        ylabel="final core latents",
        title="Final core: times selected",
    )
    ax2.set_xticks(times)
    if not ids:
        _empty(ax1, "empty core")
    return _save(fig, path)


def plot_core_density(data: RunData, path: Path) -> Path:
    """Each final-core latent's firing density, in attribution order, coloured by origin cycle;
    the dotted line is the density below which a q-quantile pooling scores a latent 0."""
    ids, _, _ = data.final_core()
    dens = data.final_core_densities()
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    if dens:
        colors = [f"C{i[0] % 10}" for i in ids]
        ax.bar(range(len(dens)), [max(d, 1e-6) for d in dens], color=colors, width=1.0)
        ax.set_yscale("log")
        att = data.config.get("attribution", {})
        if att.get("pooling") == "quantile":
            ax.axhline(1 - att["quantile"], color="grey", lw=0.8, ls=":")
        for origin in sorted({i[0] for i in ids}):
            ax.bar([], [], color=f"C{origin % 10}", label=f"from cycle {origin}")
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no densities recorded for this run's core")
    ax.set(xlabel="core latent (attribution rank)", ylabel="firing density",
           title="Final core: density of each latent")
    return _save(fig, path)


def plot_core_composition(data: RunData, path: Path) -> Path:
    """Each cycle's selected core as a stack by origin cycle (how old its latents are)."""
    n_cycles = len(data.cycles)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    xs = list(range(n_cycles))
    bottom = [0] * n_cycles
    for origin in range(n_cycles):
        h = [sum(1 for i in core if i[0] == origin) for core in data.history]
        if any(h):
            ax.bar(xs, h, bottom=bottom, label=f"from cycle {origin}", color=f"C{origin % 10}")
            bottom = [b + v for b, v in zip(bottom, h, strict=True)]
    ax.set(xlabel="cycle", ylabel="selected core", title="Core composition by origin cycle")
    ax.set_xticks(xs)
    if any(bottom):
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no latent selected")
    return _save(fig, path)


def plot_cycle_metrics(data: RunData, path: Path) -> Path:
    fig = Figure(figsize=(9, 6))
    xs = [s.cycle for s in data.cycles]
    for n, (key, label) in enumerate(CYCLE_METRICS, 1):
        ax = fig.add_subplot(2, 2, n)
        ys = [_get(s.eval, key) for s in data.cycles]
        ax.plot(xs, ys, "o-", label=label)
        if all(math.isnan(y) for y in ys):
            _empty(ax, "not in this run's metrics")
        if key == "l0":
            ax.plot(xs, [_get(s.eval, "core_l0") for s in data.cycles], "s--", label="core L0")
            ax.axhline(data.config["sae"]["k"], color="grey", lw=0.8, ls=":", label="k")
            ax.legend(fontsize="small")
        if key == "fve" and any("nested_fve" in s.eval for s in data.cycles):
            nested = [_get(s.eval, "nested_fve") for s in data.cycles]
            ax.plot(xs, nested, "s--", label="most nested")
            ax.legend(fontsize="small")
        ax.set(xlabel="cycle", title=label)
        ax.set_xticks(xs)
    return _save(fig, path)


def plot_feature_density(data: RunData, path: Path) -> Path:
    last = data.cycles[-1]
    hist = last.eval.get("feature_density_hist")
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    if hist:
        edges, counts = hist["log10_edges"], hist["counts"]
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.bar(edges[:-1], counts, width=widths, align="edge")
        ax.set(xlabel="log10 feature density (dead: -10)", ylabel="latents")
    else:
        _empty(ax, "no density histogram in this run's metrics")
    ax.set(title=f"Feature density, cycle {last.cycle}")
    return _save(fig, path)


def plot_transfer(rows: list[dict], path: Path) -> Path:
    """Metric vs measured total L0, one line per variant, mean ± standard error over seeds in
    both directions, each point labelled with its nominal k."""
    points = compare.aggregate(rows, {"l0", *(key for key, _ in TRANSFER_METRICS)})
    cols = 4
    rows_n = math.ceil(len(TRANSFER_METRICS) / cols)
    fig = Figure(figsize=(16, 3.4 * rows_n))
    for n, (key, label) in enumerate(TRANSFER_METRICS, 1):
        ax = fig.add_subplot(rows_n, cols, n)
        for variant, style in VARIANT_STYLE.items():
            pts = compare.curve(points, variant)
            if not pts:
                continue
            ax.errorbar(
                [p.l0 for p in pts], [p.mean.get(key, math.nan) for p in pts],
                xerr=[_zero_nan(p.se["l0"]) for p in pts],
                yerr=[_zero_nan(p.se.get(key, math.nan)) for p in pts],
                fmt=style, capsize=2, label=variant,
            )
            for p in pts:
                ax.annotate(f"k{p.k}", (p.l0, p.mean.get(key, math.nan)), fontsize=6, alpha=0.6)
        ax.set(xlabel="L0 (total, measured)", title=label)
        if len({r["k"] for r in rows}) > 2:
            ax.set_xscale("log")
        if n == 1:
            ax.legend(fontsize="small")
    return _save(fig, path)


def _zero_nan(v: float) -> float:
    return 0.0 if math.isnan(v) else v


def _get(d: dict, key: str) -> float:
    v = d.get(key)
    return math.nan if v is None else float(v)


def _fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def summary_markdown(
    data: RunData, plots: dict[str, Path], transfer: list[dict] | None, transfer_md: Path | None
) -> str:
    cfg, st = data.config, data.state
    ids, counts, scores = data.final_core()
    n = len(data.cycles)
    lines = [
        f"# DMSAE report: `{data.rd.root}`",
        "",
        f"- model `{cfg['model']['name']}`, layer {cfg['model']['layer']}; SAE width "
        f"{cfg['sae']['width']}, k {cfg['sae']['k']}, core activation "
        f"{cfg['sae'].get('core_activation', 'relu')} ({cfg['sae']['l0_budget']} L0 budget); "
        f"tau {cfg['distill']['tau']}, core mode {cfg['distill']['core_mode']}",
        f"- status **{st['status']}**: {n} of {cfg['distill']['cycles'] + 1} cycles committed; "
        f"{cfg['train']['tokens_per_cycle']:,} tokens per cycle; norm factor "
        f"{_fmt(st.get('norm_factor'), 4)}",
        "",
        "## Cycles",
        "",
        "| cycle | core in | core out | Jaccard | attribution reached | L0 | core L0 "
        "| FVE | CE loss recovered | KL score | alive |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data.cycles:
        ev = s.eval
        lines.append(
            f"| {s.cycle} | {s.core_in} | {s.core_size} | {_fmt(s.jaccard)} "
            f"| {_fmt(s.fraction)} | {_fmt(ev.get('l0'), 1)} | {_fmt(ev.get('core_l0'), 1)} "
            f"| {_fmt(ev.get('fve'))} | {_fmt(ev.get('ce_loss_score'))} "
            f"| {_fmt(ev.get('kl_div_score'))} | {_fmt(ev.get('frac_alive'))} |"
        )
    lines += ["", *(_img(plots, k) for k in ("core_size", "jaccard", "cycle_metrics"))]
    every = sum(1 for c in counts if c == n)
    by_origin = Counter(i[0] for i in ids)
    lines += [
        "",
        f"## Final core: {len(ids)} latents",
        "",
        f"Selected in all {n} cycles: {every}; by origin cycle: "
        + (", ".join(f"cycle {c}: {by_origin[c]}" for c in sorted(by_origin)) or "-")
        + ("" if data.distilled else " (run not completed: last committed cycle's selection)"),
        "",
        _img(plots, "core_origins"),
        _img(plots, "core_composition"),
        "",
        "Top latents by attribution (id = origin cycle:index in that cycle; inspect one with "
        f"`dmsae inspect {data.rd.root} --latent ID`):",
        "",
        "| rank | id | attribution | times selected | density |",
        "|---|---|---|---|---|",
    ]
    dens = data.final_core_densities() or [None] * len(ids)
    for r, (lid, c, sc, d) in enumerate(list(zip(ids, counts, scores, dens, strict=True))[:20], 1):
        lines.append(f"| {r} | `{lid[0]}:{lid[1]}` | {sc:.4g} | {c} | {_fmt(d, 4)} |")
    if any(d is not None for d in dens):
        lines += ["", _img(plots, "core_density")]
    lines += ["", "## Feature density (last cycle)", "", _img(plots, "feature_density")]
    lines += ["", "## Transfer across sparsity levels", ""]
    if transfer:
        lines += [
            f"From `{transfer_md}`: distilled core vs plain Matryoshka baseline vs random core, "
            "same width, tokens and seed, total L0 matched.",
            "",
            _img(plots, "transfer_metrics"),
        ]
        if transfer_md is not None and transfer_md.is_file():
            body = transfer_md.read_text().split("\n", 1)[1]  # its own title dropped
            lines += ["", body.strip()]
    else:
        lines.append(
            f"No transfer table yet: `dmsae transfer --core {data.rd.root} --k 20,40,80,160` "
            "writes one, then run `dmsae report` again."
        )
    return "\n".join(lines) + "\n"


def _img(plots: dict[str, Path], key: str) -> str:
    return f"![{key}]({plots[key].name})" if key in plots else ""


def build_report(
    run_dir: str | Path, transfer: str | Path | None = None, out: str | Path | None = None
) -> dict[str, Path]:
    """Writes ``summary.md`` and the plots; returns every written file by name."""
    data = RunData(run_dir)
    out = Path(out) if out is not None else data.rd.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "core_size": plot_core_size(data, out / "core_size.png"),
        "jaccard": plot_jaccard(data, out / "jaccard.png"),
        "core_origins": plot_core_origins(data, out / "core_origins.png"),
        "core_composition": plot_core_composition(data, out / "core_composition.png"),
        "core_density": plot_core_density(data, out / "core_density.png"),
        "cycle_metrics": plot_cycle_metrics(data, out / "cycle_metrics.png"),
        "feature_density": plot_feature_density(data, out / "feature_density.png"),
    }
    table = Path(transfer) if transfer is not None else data.rd.root / "transfer" / "transfer.csv"
    if transfer is not None and not table.is_file():
        raise ConfigError(f"--transfer {table}: no such file")
    rows = read_table(table) if table.is_file() else None
    if rows:
        plots["transfer_metrics"] = plot_transfer(rows, out / "transfer_metrics.png")
    md = table.with_name("transfer.md") if rows else None
    (out / "summary.md").write_text(summary_markdown(data, plots, rows, md))
    return plots | {"summary": out / "summary.md"}


# ----------------------------------------------------------------------------- sweep plots


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_sweep_plots(sweep_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """Core size / coverage / sparsity against tau (or the first numeric swept key), one line
    per combination of the other swept keys (per k in a tau x k grid); and Jaccard against
    cycle per trial. Figures through the Agg canvas: no display, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in summary["rows"] if r["status"] == "completed"]
    keys = summary["keys"]
    numeric = [k for k in keys if rows and all(_numeric(r[k]) for r in rows)]
    xkey = "distill.tau" if "distill.tau" in numeric else (numeric[0] if numeric else None)
    others = [k for k in keys if k != xkey]
    out = []

    fig = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (
        ("core size", "core_size", "selected_every_cycle",
         "solid: final core, dashed: selected in every cycle"),
        ("coverage", "fve", "ce_loss_score",
         "solid: variance explained, dashed: CE loss recovered"),
        ("sparsity", "l0", "core_l0", "solid: L0, dashed: core L0"),
    )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in others), []).append(r)
    # Numeric order (k=40 before k=160), whatever the types of the values.
    order = sorted(groups, key=lambda g: [(not _numeric(v), v if _numeric(v) else str(v))
                                          for v in g])
    colors = _colors(len(order))
    for ax, (title, solid, dashed, styles) in zip(axes, panels, strict=True):
        for color, group in zip(colors, order, strict=True):
            rs = groups[group]
            if xkey:
                rs = sorted(rs, key=lambda r: r[xkey])
                xs: list[Any] = [r[xkey] for r in rs]
            else:
                xs = [r["trial"].rsplit("-", 1)[0] for r in rs]
            label = ", ".join(
                f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in zip(others, group, strict=True)
            )
            for metric, style in ((solid, "-"), (dashed, "--")):
                ys = [r[metric] if r[metric] is not None else math.nan for r in rs]
                ax.plot(xs, ys, style, marker="o", color=color,
                        label=label if style == "-" and label else "_nolegend_")
        ax.set_title(f"{title}\n({styles})", fontsize=10)
        ax.set_xlabel(xkey or "trial")
        ax.grid(alpha=0.3)
        if not xkey:
            ax.tick_params(axis="x", labelrotation=45)
    if others and rows:
        axes[0].legend(fontsize=7)
    if not rows:
        fig.suptitle("no completed trial yet")
    path = sweep_dir / PLOT_CORE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    out.append(path)

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    plotted = False
    series = summary["cycles"]  # in the plan's order
    for color, (name, cycles) in zip(_colors(len(series)), series.items(), strict=True):
        pts = [(c["cycle"], c["jaccard"]) for c in cycles if c.get("jaccard") is not None]
        if pts:
            label = name.rsplit("-", 1)[0]  # the parameters, without the config hash
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=label)
            plotted = True
    ax.set_xlabel("cycle")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Jaccard to the previous core")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=6, ncol=2 if len(series) > 12 else 1)
    else:
        ax.set_title("no distillation cycle committed yet (Jaccard starts at cycle 1)")
    path = sweep_dir / PLOT_JACCARD
    fig.savefig(path, dpi=100)
    out.append(path)
    return out
