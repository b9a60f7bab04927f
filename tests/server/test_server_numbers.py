"""Properties of the numbers the read API derives: buckets and the histogram median."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from mmagg.server.queries import confidence_bucket, histogram_median
from mmagg.window import HISTOGRAM_BUCKETS

confidences = st.floats(min_value=-2.0, max_value=3.0, allow_nan=False)


@given(st.lists(confidences, min_size=1, max_size=50))
def test_sample_buckets_match_the_clients_stats_histogram(values: list[float]) -> None:
    # The client's vectorised bucketing (mmagg.window) and the server's, for samples that
    # come without stats, must agree so that summed histograms mix both kinds correctly.
    scaled = np.asarray(values, dtype=np.float64) * HISTOGRAM_BUCKETS
    np.minimum(np.maximum(scaled, 0.0, out=scaled), HISTOGRAM_BUCKETS - 1, out=scaled)
    assert [confidence_bucket(v) for v in values] == scaled.astype(np.int64).tolist()


@given(st.lists(st.integers(min_value=0, max_value=1_000), min_size=10, max_size=10))
def test_histogram_median_lies_in_the_median_bucket(histogram: list[int]) -> None:
    total = sum(histogram)
    median = histogram_median(histogram)
    if total == 0:
        assert median is None
        return
    assert median is not None
    running = np.cumsum(histogram)
    bucket = int(np.searchsorted(running, total / 2))
    assert bucket / 10 <= median <= (bucket + 1) / 10 + 1e-12
