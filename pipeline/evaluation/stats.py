"""Paired statistics over clips: per-arm mean +- SE, mean paired difference with a 95% CI, tests."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_se(values) -> tuple[float, float]:
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    se = x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return float(x.mean()), float(se)


def paired_comparison(baseline, adapted, confidence: float = 0.95) -> dict[str, float]:
    """Statistics of adapted - baseline over clips paired by position."""
    b, a = np.asarray(baseline, dtype=float), np.asarray(adapted, dtype=float)
    if b.shape != a.shape:
        raise ValueError(f"paired arms differ in length: {len(b)} baseline vs {len(a)} adapted clips")
    diff = a - b
    n = len(diff)
    mean, se = mean_se(diff)
    out = {"n": n, "baseline_mean": mean_se(b)[0], "baseline_se": mean_se(b)[1], "adapted_mean": mean_se(a)[0],
           "adapted_se": mean_se(a)[1], "diff_mean": mean, "diff_se": se, "ci_low": math.nan, "ci_high": math.nan,
           "t_p_value": math.nan, "wilcoxon_p_value": math.nan}
    if n < 2:
        return out
    if se > 0:
        half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * se
        out.update(ci_low=mean - half, ci_high=mean + half, t_p_value=float(stats.ttest_rel(a, b).pvalue))
    else:
        out.update(ci_low=mean, ci_high=mean, t_p_value=1.0 if mean == 0 else 0.0)
    if np.any(diff != 0):
        out["wilcoxon_p_value"] = float(stats.wilcoxon(diff).pvalue)
    return out


def per_frame_curve(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and SE at each frame index over clips (rows of equal length)."""
    x = np.asarray(rows, dtype=float)
    means = x.mean(0)
    se = x.std(0, ddof=1) / math.sqrt(len(x)) if len(x) > 1 else np.full_like(means, math.nan)
    return means.tolist(), se.tolist()


def paired_frame_difference(baseline: list[list[float]], adapted: list[list[float]],
                            confidence: float = 0.95) -> dict[str, list[float]]:
    """Per frame index, the mean of adapted - baseline over clips with its t confidence interval
    (empty lists when no clip is paired yet)."""
    n = len(adapted)
    if n == 0:
        return {"mean": [], "ci_low": [], "ci_high": []}
    diff = np.asarray(adapted, dtype=float) - np.asarray(baseline, dtype=float)
    mean = diff.mean(0)
    if n < 2:
        nan = np.full_like(mean, math.nan)
        return {"mean": mean.tolist(), "ci_low": nan.tolist(), "ci_high": nan.tolist()}
    half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * diff.std(0, ddof=1) / math.sqrt(n)
    return {"mean": mean.tolist(), "ci_low": (mean - half).tolist(), "ci_high": (mean + half).tolist()}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted
