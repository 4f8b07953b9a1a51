"""Plotly figures of an evaluation: arm means with SE bars (controls included), the paired
differences of the primary comparison, and the paired per-frame difference with its 95% CI."""
from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def summary_figure(summary: dict) -> go.Figure:
    """One row per metric: arm means ± SE | adapted − baseline per clip (ITT) | per-frame paired
    difference of each treated arm against the baseline, mean and 95% CI."""
    metrics = list(summary["per_frame"])
    fig = make_subplots(rows=max(1, len(metrics)), cols=3, subplot_titles=[
        title.format(m) for m in metrics for title in ("{} mean ± SE per arm", "{}: adapted − baseline per clip (ITT)",
                                                       "{}: arm − baseline per frame, 95% CI")])
    arms = summary["arms"]
    for row, name in enumerate(metrics, start=1):
        fig.add_trace(go.Bar(x=list(arms), y=[a["means"][name][0] for a in arms.values()],
                             error_y={"type": "data", "array": [a["means"][name][1] for a in arms.values()]},
                             hovertext=[a["label"] for a in arms.values()], showlegend=False), row=row, col=1)
        primary = next(c for c in summary["comparisons"] if c["metric"] == name and c["a"] == "adapted"
                       and c["b"] == "baseline" and c["analysis"].startswith("ITT"))
        fig.add_trace(go.Histogram(x=primary["differences"], nbinsx=20, showlegend=False), row=row, col=2)
        for label, curve in summary["per_frame"][name]["differences"].items():
            frames = curve["frame"]
            fig.add_trace(go.Scatter(x=frames + frames[::-1], y=curve["ci_high"] + curve["ci_low"][::-1],
                                     fill="toself", opacity=0.2, line={"width": 0}, showlegend=False,
                                     hoverinfo="skip"), row=row, col=3)
            fig.add_trace(go.Scatter(x=frames, y=curve["mean"], mode="lines+markers", name=label,
                                     showlegend=row == 1), row=row, col=3)
        fig.add_hline(y=0, line_dash="dot", row=row, col=3)
    fig.update_layout(height=320 * max(1, len(metrics)), title=summary["title"])
    return fig


def write_html(fig: go.Figure, path: Path) -> Path:
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
