"""Plotly figures of the viewer. Every figure puts one point (or bar) per clip or per arm."""
from __future__ import annotations

import math

import plotly.graph_objects as go


def means_figure(names: list[str], means: list[float], ses: list[float], metric: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=names, y=means, error_y={"type": "data", "array": ses}))
    return fig.update_layout(title=f"{metric}: mean ± SE per arm", height=360)


def difference_histogram(deltas: dict[str, list[float]], metric: str) -> go.Figure:
    fig = go.Figure([go.Histogram(x=v, name=name, opacity=0.7, nbinsx=20) for name, v in deltas.items()])
    return fig.update_layout(title=f"{metric}: adapted − baseline per clip", barmode="overlay", height=360)


def scatter_figure(baseline: list[float], adapted: dict[str, list[float]], clips: list[str], metric: str) -> go.Figure:
    fig = go.Figure([go.Scatter(x=baseline, y=v, mode="markers", name=name, text=clips) for name, v in adapted.items()])
    finite = [x for x in baseline + [y for v in adapted.values() for y in v] if not math.isnan(x)]
    if finite:
        lo, hi = min(finite), max(finite)
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line={"dash": "dash", "color": "grey"})
    return fig.update_layout(title=f"{metric}: baseline vs adapted per clip (above the line: adapted higher)",
                             xaxis_title="baseline", yaxis_title="adapted", height=400)


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
    return fig.update_layout(title=f"cost vs gain per adapted arm: mean Δ{metric} against adaptation seconds per clip",
                             xaxis_title="adaptation seconds per clip", yaxis_title=f"mean Δ{metric}", height=380)
