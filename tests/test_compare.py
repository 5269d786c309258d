"""Comparison at measured L0: aggregation over seeds, interpolation, verdicts, by hand."""

import math

import pytest

from dmsae_ray.tools.compare import Z, aggregate, at_l0, compare, curve, tally, verdict

approx = pytest.approx


def rows_of(variant: str, points: list[tuple[int, list[float], list[float]]]) -> list[dict]:
    """(k, L0 per seed, fve per seed) -> one row per seed."""
    return [
        {"variant": variant, "k": k, "seed": s, "l0": l0, "fve": fve}
        for k, l0s, fves in points
        for s, (l0, fve) in enumerate(zip(l0s, fves, strict=True))
    ]


def test_points_are_means_and_standard_errors_over_seeds():
    (p,) = aggregate(rows_of("a", [(8, [9.0, 11.0, 10.0], [0.5, 0.7, 0.6])]), ["l0", "fve"])
    assert (p.variant, p.k, p.n) == ("a", 8, 3)
    assert p.l0 == approx(10.0) and p.se["l0"] == approx(math.sqrt(1.0 / 3))
    assert p.mean["fve"] == approx(0.6) and p.se["fve"] == approx(math.sqrt(0.01 / 3))
    (one,) = aggregate(rows_of("a", [(8, [9.0], [0.5])]), ["l0", "fve"])
    assert one.l0 == 9.0 and math.isnan(one.se["l0"])  # one seed: no standard error


def test_the_other_curve_is_read_at_the_measured_l0_in_log_space():
    pts = aggregate(rows_of("b", [(4, [4, 4], [0.4, 0.4]), (16, [16, 16], [0.8, 0.6])]),
                    ["l0", "fve"])
    b = curve(pts, "b")
    mean, se = at_l0(b, 8.0, "fve")  # halfway between 4 and 16 in log L0
    assert mean == approx(0.55) and se == approx(0.5 * 0.1)
    assert at_l0(b, 4.0, "fve")[0] == approx(0.4) and at_l0(b, 16.0, "fve")[0] == approx(0.7)
    assert at_l0(b, 3.9, "fve") is None and at_l0(b, 17, "fve") is None  # no extrapolation


def test_verdicts_use_the_combined_standard_error_and_the_metric_direction():
    assert verdict(0.3, 0.1, +1) == "better" and verdict(0.3, 0.1, -1) == "worse"
    assert verdict(Z * 0.1 - 1e-9, 0.1, +1) == "within noise"
    assert verdict(math.nan, 0.1, 1) == "out of range"
    assert verdict(0.3, math.nan, 1) == "no noise estimate"
    rows = rows_of("distilled", [(6, [8.0, 8.0], [0.9, 0.9]), (30, [40.0, 40.0], [1.0, 1.0])])
    rows += rows_of("baseline", [(4, [4, 4], [0.4, 0.4]), (16, [16, 16], [0.8, 0.6])])
    comps = compare(aggregate(rows, ["l0", "fve", "mse"]), "distilled", "baseline", ["fve"])
    first, second = comps
    # distilled at measured L0 8 (k 6) vs baseline read at L0 8 (not at k 6 or 4)
    assert (first.k, first.l0, first.other) == (6, 8.0, approx(0.55))
    assert first.diff == approx(0.35) and first.noise == approx(0.05)
    assert first.verdict == "better"
    assert second.verdict == "out of range" and math.isnan(second.diff)
    assert tally(comps) == {"fve": {"better": 1, "out of range": 1}}
