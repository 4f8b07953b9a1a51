"""Plotly figures of an evaluation: arm means with SE bars, paired differences, per-frame curves."""
from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def summary_figure(summary: dict) -> go.Figure:
    """One figure, one row per metric: means +- SE | histogram of adapted - baseline | per-frame curves."""
    metrics = list(summary["metrics"])
    fig = make_subplots(rows=len(metrics), cols=3, subplot_titles=[
        title.format(m) for m in metrics for title in ("{} mean ± SE", "{}: adapted − baseline per clip",
                                                       "{} per frame (mean ± SE)")])
    arms = summary["arms"]
    for row, name in enumerate(metrics, start=1):
        s = summary["metrics"][name]
        fig.add_trace(go.Bar(x=list(arms.values()), y=[s["baseline_mean"], s["adapted_mean"]],
                             error_y={"type": "data", "array": [s["baseline_se"], s["adapted_se"]]},
                             showlegend=False), row=row, col=1)
        fig.add_trace(go.Histogram(x=s["differences"], nbinsx=20, showlegend=False), row=row, col=2)
        for arm, label in arms.items():
            curve = s["per_frame"][arm]
            upper = [m + e for m, e in zip(curve["mean"], curve["se"])]
            lower = [m - e for m, e in zip(curve["mean"], curve["se"])]
            frames = curve["frame"]
            fig.add_trace(go.Scatter(x=frames + frames[::-1], y=upper + lower[::-1], fill="toself", opacity=0.2,
                                     line={"width": 0}, showlegend=False, hoverinfo="skip"), row=row, col=3)
            fig.add_trace(go.Scatter(x=frames, y=curve["mean"], mode="lines+markers", name=label,
                                     showlegend=row == 1), row=row, col=3)
    fig.update_layout(height=320 * len(metrics), title=summary["title"])
    return fig


def write_html(fig: go.Figure, path: Path) -> Path:
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
