"""Drift measures on confidence histograms and class mixes (docs/alerts.md, "Drift").

Everything here is plain arithmetic on lists of counts, shared by the read API, the
dashboard and the alert engine:

- `psi(recent, baseline)`: the Population Stability Index over the 10 confidence buckets of
  docs/wire-format.md. Conventional reading (credit-risk practice, e.g. Yurdakul 2018):
  below 0.1 no significant change, 0.1-0.25 moderate, above 0.25 significant.
- `js_distance(recent, baseline)`: the Jensen-Shannon distance (base 2, so in [0, 1]),
  reported beside PSI because it is bounded and symmetric.
- `histogram_quantile(counts, q)`: a quantile (median, p10) estimated from bucket counts,
  linear within the bucket.

Empty buckets would make PSI infinite; both distributions are smoothed with half a count per
bucket (`SMOOTHING`) before comparing, which only matters for sparse histograms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25
SMOOTHING = 0.5


def _proportions(counts: Sequence[float], smoothing: float) -> list[float]:
    total = sum(counts) + smoothing * len(counts)
    return [(c + smoothing) / total for c in counts]


def psi(recent: Sequence[float], baseline: Sequence[float], smoothing: float = SMOOTHING) -> float:
    """Population Stability Index of `recent` against `baseline` (same buckets).

    PSI = sum over buckets of (r - b) * ln(r / b), with r, b the smoothed shares.

    Example:
        >>> psi([10, 20, 70], [10, 20, 70])
        0.0
        >>> round(psi([70, 20, 10], [10, 20, 70]), 2)
        2.25
    """
    if len(recent) != len(baseline):
        raise ValueError(
            f"baseline: expected {len(recent)} buckets like the recent histogram, "
            f"got {len(baseline)}"
        )
    if not recent:
        return 0.0
    r = _proportions(recent, smoothing)
    b = _proportions(baseline, smoothing)
    value = sum((ri - bi) * math.log(ri / bi) for ri, bi in zip(r, b, strict=True))
    return max(value, 0.0)


def js_distance(
    recent: Sequence[float], baseline: Sequence[float], smoothing: float = SMOOTHING
) -> float:
    """Jensen-Shannon distance (square root of the divergence, log base 2): 0 same, 1 disjoint.

    Example:
        >>> js_distance([5, 5], [5, 5])
        0.0
        >>> round(js_distance([100, 0], [0, 100], smoothing=0), 3)
        1.0
    """
    if len(recent) != len(baseline):
        raise ValueError(
            f"baseline: expected {len(recent)} buckets like the recent histogram, "
            f"got {len(baseline)}"
        )
    if not recent or (sum(recent) + sum(baseline)) == 0:
        return 0.0
    r = _proportions(recent, smoothing)
    b = _proportions(baseline, smoothing)
    divergence = 0.0
    for ri, bi in zip(r, b, strict=True):
        mi = (ri + bi) / 2
        if ri > 0:
            divergence += 0.5 * ri * math.log2(ri / mi)
        if bi > 0:
            divergence += 0.5 * bi * math.log2(bi / mi)
    return math.sqrt(max(divergence, 0.0))


def level(score: float | None) -> str:
    """`none`, `moderate` or `significant` by the conventional PSI thresholds; `unknown` for None.

    Example:
        >>> [level(0.05), level(0.1), level(0.3), level(None)]
        ['none', 'moderate', 'significant', 'unknown']
    """
    if score is None:
        return "unknown"
    if score >= PSI_SIGNIFICANT:
        return "significant"
    if score >= PSI_MODERATE:
        return "moderate"
    return "none"


def class_mix(
    recent: Mapping[str, float], baseline: Mapping[str, float]
) -> tuple[list[float], list[float]]:
    """Two aligned count vectors over the union of class names (sorted), for `psi`.

    Example:
        >>> class_mix({"car": 3}, {"car": 1, "person": 1})
        ([3, 0], [1, 1])
    """
    names = sorted(set(recent) | set(baseline))
    return [recent.get(n, 0) for n in names], [baseline.get(n, 0) for n in names]


def histogram_quantile(counts: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of values counted in equal buckets over [0, 1].

    Linear within the bucket that holds it; None for an empty histogram.

    Example:
        >>> histogram_quantile([0, 0, 0, 0, 0, 10, 0, 0, 0, 0], 0.5)
        0.55
        >>> histogram_quantile([10, 0, 0, 0, 0, 0, 0, 0, 0, 10], 0.1)
        0.02
    """
    total = sum(counts)
    if total <= 0:
        return None
    target = q * total
    width = 1 / len(counts)
    seen = 0.0
    for index, count in enumerate(counts):
        if count and seen + count >= target:
            return round((index + (target - seen) / count) * width, 12)
        seen += count
    return 1.0
