"""Comparing SAE variants at the same *measured* L0, with seeds as the noise estimate.

Plain Python, no torch: ``dmsae transfer`` and ``dmsae study`` feed it one row per trained SAE
(variant, nominal k, seed, metrics) and get back

- ``points``: per (variant, k) the mean and standard error over seeds of every metric, the
  measured total L0 included;
- ``comparisons``: for every point of one variant and every metric, the other variant's curve
  read off at the same measured L0 (linear interpolation in log L0 between its two neighbouring
  points, never extrapolated), the difference, its noise and a verdict.

Nominal k is only the knob: a relu core that fires past k, or a threshold learned a little off,
moves a variant's real L0, and comparing at equal k would then compare different sparsities.

The noise of a difference is the combined standard error, sqrt(se_a^2 + se_b^2), where the other
curve's standard error is interpolated like its mean (independent neighbours). The verdict is
``better`` / ``worse`` when the difference, signed so that positive is better for the metric,
exceeds ``Z`` times that noise, else ``within noise``; a point outside the other curve's
measured L0 range is ``out of range``; one seed gives ``no noise estimate``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Seeds per point unless asked otherwise: the fewest that give a standard error at all, plus one.
DEFAULT_SEEDS = 3
# |difference| > Z * combined standard error counts as a difference (about 95 % two-sided for a
# normal; with 3 seeds per point the standard errors are themselves rough, so read it as a
# screening threshold, not a p-value).
Z = 2.0

# +1: higher is better; -1: lower is better. The metrics a verdict is given for.
DIRECTION: dict[str, int] = {
    "fve": 1,
    "explained_variance": 1,
    "mse": -1,
    "cossim": 1,
    "ce_loss_score": 1,
    "kl_div_score": 1,
    "frac_alive": 1,
    "average_max_encoder_cosine_sim": -1,  # lower: less redundant latents
    "average_max_decoder_cosine_sim": -1,
}


@dataclass
class Point:
    variant: str
    k: int
    n: int  # seeds
    mean: dict[str, float]
    se: dict[str, float]

    @property
    def l0(self) -> float:
        return self.mean["l0"]


def _mean_se(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    m = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    var = math.fsum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var / len(vals))


def aggregate(rows: Iterable[dict], metrics: Iterable[str]) -> list[Point]:
    """Mean and standard error over seeds per (variant, k), in first-seen order."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], int(r["k"])), []).append(r)
    points = []
    for (variant, k), rs in groups.items():
        stats = {m: _mean_se([r.get(m, math.nan) for r in rs]) for m in metrics}
        points.append(Point(variant, k, len(rs), {m: s[0] for m, s in stats.items()},
                            {m: s[1] for m, s in stats.items()}))
    return points


def curve(points: list[Point], variant: str) -> list[Point]:
    """One variant's points in order of measured L0."""
    return sorted((p for p in points if p.variant == variant and not math.isnan(p.l0)),
                  key=lambda p: p.l0)


def at_l0(other: list[Point], l0: float, metric: str) -> tuple[float, float] | None:
    """``other``'s mean and standard error of ``metric`` at measured L0 ``l0``, interpolated
    linearly in log L0; None outside its measured range."""
    if not other or l0 <= 0 or not other[0].l0 <= l0 <= other[-1].l0:
        return None
    for a, b in zip(other, other[1:], strict=False):
        if a.l0 <= l0 <= b.l0:
            break
    else:  # a single point, at exactly this L0
        a = b = other[0]
    if b.l0 == a.l0:
        w = 0.0
    else:
        w = (math.log(l0) - math.log(a.l0)) / (math.log(b.l0) - math.log(a.l0))
    mean = (1 - w) * a.mean[metric] + w * b.mean[metric]
    se = math.sqrt(((1 - w) * a.se[metric]) ** 2 + (w * b.se[metric]) ** 2)
    return mean, se


@dataclass
class Comparison:
    k: int  # the nominal k of the compared point
    l0: float  # its measured L0, where the other curve is read
    metric: str
    value: float
    other: float
    diff: float  # value - other
    noise: float
    verdict: str


def verdict(diff: float, noise: float, direction: int) -> str:
    if math.isnan(diff):
        return "out of range"
    if math.isnan(noise):
        return "no noise estimate"
    signed = diff * direction
    if signed > Z * noise:
        return "better"
    if signed < -Z * noise:
        return "worse"
    return "within noise"


def compare(
    points: list[Point], variant: str, against: str, metrics: Iterable[str] = DIRECTION
) -> list[Comparison]:
    """``variant`` minus ``against`` at each of ``variant``'s measured L0s."""
    mine, other = curve(points, variant), curve(points, against)
    out = []
    for p in mine:
        for m in metrics:
            read = at_l0(other, p.l0, m)
            value = p.mean[m]
            if read is None:
                out.append(Comparison(p.k, p.l0, m, value, math.nan, math.nan, math.nan,
                                      "out of range"))
                continue
            diff = value - read[0]
            noise = math.sqrt(p.se[m] ** 2 + read[1] ** 2)
            out.append(Comparison(p.k, p.l0, m, value, read[0], diff, noise,
                                  verdict(diff, noise, DIRECTION.get(m, 1))))
    return out


def tally(comparisons: list[Comparison]) -> dict[str, dict[str, int]]:
    """Per metric: how many points were better / worse / within noise / not comparable."""
    out: dict[str, dict[str, int]] = {}
    for c in comparisons:
        counts = out.setdefault(c.metric, {})
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    return out


def fmt(v: float, se: float | None = None, digits: int = 4) -> str:
    if v is None or math.isnan(v):
        return "-"
    text = f"{v:.{digits}g}"
    if se is not None and not math.isnan(se):
        text += f" ± {se:.2g}"
    return text


def comparison_table(comparisons: list[Comparison], variant: str, against: str) -> list[str]:
    """Markdown rows: one per (point, metric)."""
    lines = [
        f"| k | measured L0 | metric | {variant} | {against} at that L0 | difference "
        "| noise (SE) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.k} | {c.l0:.1f} | {c.metric} | {fmt(c.value)} | {fmt(c.other)} "
            f"| {fmt(c.diff, digits=3)} | {fmt(c.noise, digits=2)} | {c.verdict} |"
        )
    return lines


def tally_table(comparisons: list[Comparison]) -> list[str]:
    """Markdown rows: per metric, the verdict counts over the compared points."""
    kinds = ("better", "worse", "within noise", "out of range", "no noise estimate")
    lines = ["| metric | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for metric, counts in tally(comparisons).items():
        lines.append(f"| {metric} | " + " | ".join(str(counts.get(k, 0)) for k in kinds) + " |")
    return lines
