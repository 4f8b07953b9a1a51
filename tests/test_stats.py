"""Paired statistics: Holm-adjusted p-values and the per-frame paired difference with its CI."""
import math

import numpy as np
import pytest
from scipy import stats

from pipeline.evaluation.stats import holm, paired_comparison, paired_frame_difference


def test_holm_adjusts_in_order_and_skips_missing_tests():
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_per_frame_difference_matches_a_paired_t_interval_at_each_frame():
    rng = np.random.default_rng(0)
    baseline = rng.normal(20, 2, (9, 4))
    adapted = baseline + rng.normal(0.5, 1, (9, 4))
    curve = paired_frame_difference(baseline.tolist(), adapted.tolist())
    for f in range(4):
        interval = stats.ttest_rel(adapted[:, f], baseline[:, f]).confidence_interval(0.95)
        assert curve["mean"][f] == pytest.approx((adapted[:, f] - baseline[:, f]).mean())
        assert (curve["ci_low"][f], curve["ci_high"][f]) == pytest.approx((interval.low, interval.high))
    single = paired_frame_difference(baseline[:1].tolist(), adapted[:1].tolist())
    assert all(math.isnan(x) for x in single["ci_low"])
    # an arm with no clip paired yet (all of its clips killed or not run): no curve, no crash
    assert paired_frame_difference([], []) == {"mean": [], "ci_low": [], "ci_high": []}


def test_paired_comparison_with_one_clip_has_no_interval():
    out = paired_comparison([1.0], [2.0])
    assert out["n"] == 1 and out["diff_mean"] == 1.0 and math.isnan(out["ci_low"]) and math.isnan(out["t_p_value"])
