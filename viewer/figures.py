"""Plotly figures of the viewer. Every figure puts one point (or bar) per clip or per arm."""
from __future__ import annotations

import math

import plotly.graph_objects as go


def means_figure(names: list[str], means: list[float], ses: list[float], metric: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=names, y=means, error_y={"type": "data", "array": ses}))
    return fig.update_layout(title=f"{metric}: mean ± SE per arm", height=360)


def difference_histogram(deltas: dict[str, list[float]], metric: str) -> go.Figure:
    fig = go.Figure([go.Histogram(x=v, name=name, opacity=0.7, nbinsx=20) for name, v in deltas.items()])
    return fig.update_layout(title=f"{metric}: adapted − baseline per clip (the clips each arm finished)",
                             barmode="overlay", height=360)


def scatter_figure(baseline: dict[str, float], arms: dict[str, dict[str, float]], metric: str) -> go.Figure:
    """One point per clip that the baseline and an arm both have a value for (clip -> value)."""
    fig = go.Figure()
    for name, values in arms.items():
        clips = [c for c in values if c in baseline]
        fig.add_trace(go.Scatter(x=[baseline[c] for c in clips], y=[values[c] for c in clips], mode="markers",
                                 name=name, text=clips))
    every = [*baseline.values(), *(y for values in arms.values() for y in values.values())]
    if every:
        lo, hi = min(every), max(every)
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line={"dash": "dash", "color": "grey"})
    return fig.update_layout(title=f"{metric}: baseline vs each arm per clip (above the line: the arm higher)",
                             xaxis_title="baseline", yaxis_title="arm", height=400)


def frame_curves(curves: dict[str, dict[str, list]], metric: str, context: int | None) -> go.Figure:
    fig = go.Figure()
    for name, c in curves.items():
        upper = [m + (s if not math.isnan(s) else 0) for m, s in zip(c["mean"], c["se"])]
        lower = [m - (s if not math.isnan(s) else 0) for m, s in zip(c["mean"], c["se"])]
        fig.add_trace(go.Scatter(x=c["frame"] + c["frame"][::-1], y=upper + lower[::-1], fill="toself", opacity=0.2,
                                 line={"width": 0}, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=c["frame"], y=c["mean"], mode="lines+markers", name=name))
    if context is not None:
        fig.add_vline(x=context - 0.5, line_dash="dot", annotation_text="context ends")
    return fig.update_layout(title=f"{metric} per frame (mean ± SE over clips)", xaxis_title="frame", height=380)


def cost_gain_figure(names: list[str], seconds: list[float], gains: list[float], metric: str) -> go.Figure:
    fig = go.Figure(go.Scatter(x=seconds, y=gains, mode="markers+text", text=names, textposition="top center"))
    fig.add_hline(y=0, line_dash="dash", line_color="grey")
    return fig.update_layout(title=f"cost vs gain per adapted arm: mean Δ{metric} (ITT)",
                             xaxis_title="adaptation seconds per clip", yaxis_title=f"mean Δ{metric} (ITT)",
                             height=380)


def gain_by_setting(rows: list[dict], key: str, grid: dict[str, list[str]], metric: str,
                    kind: str = "sweep") -> go.Figure:
    """A sweep's (or step curve's) paired gain (with its CI) against one swept setting: one line per
    combination of the other swept settings, the values in the grid's order."""
    gain, others = f"Δ{metric} (ITT)", [k for k in grid if k != key]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(" ".join(f"{k}={row[k]}" for k in others) or "all", []).append(row)
    fig = go.Figure()
    for name, members in groups.items():
        members = sorted(members, key=lambda r: grid[key].index(r[key]))
        fig.add_trace(go.Scatter(
            x=[r[key] for r in members], y=[r[gain] for r in members], mode="lines+markers", name=name,
            error_y={"type": "data", "symmetric": False, "array": [r["CI high"] - r[gain] for r in members],
                     "arrayminus": [r[gain] - r["CI low"] for r in members]}))
    fig.add_hline(y=0, line_dash="dash", line_color="grey")
    return fig.update_layout(title=f"{kind}: Δ{metric} (ITT, 95% CI) against {key}", xaxis_title=key,
                             xaxis_type="category", yaxis_title=f"Δ{metric}", height=380)
