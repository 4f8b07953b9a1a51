"""Streamlit viewer: on which clips did adaptation help or hurt, by how much, what does it look like,
and what did it cost? Reads the tracking store named by MLFLOW_TRACKING_URI; never writes to it."""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run viewer/app.py` from the repo

import mlflow  # noqa: E402
import streamlit as st  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.tracking.runs import frame_history  # noqa: E402
from viewer import compose, data, figures  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "tta-viewer-cache"
st.set_page_config(page_title="TTA viewer", layout="wide")


def main() -> None:
    st.title("Test-time adaptation: continuations side by side")
    uri = mlflow.get_tracking_uri()
    st.caption(f"tracking store: {uri}")
    client = MlflowClient()
    try:
        experiments = data.list_experiments(client)
    except Exception as exc:  # an unreachable server, a missing database, ...
        st.error(f"Cannot read the tracking store {uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return
    if not experiments:
        st.info("No experiments yet. Run `make demo` (or any baseline/adapt stage) to fill the store.")
        return
    experiment = st.sidebar.selectbox("Experiment", experiments, format_func=lambda e: e.name)
    arms = data.list_arms(client, experiment.experiment_id)
    baselines = [a for a in arms if a.stage == "baseline"]
    adapted_all = [a for a in arms if a.stage == "adapt"]
    if not baselines or not adapted_all:
        st.info("This experiment needs a baseline and at least one adapt run to compare.")
        return
    label = {a.key: f"{a.label} · {len(a.clips)} clips · {a.digest[:8]}" for a in arms}
    baseline = st.sidebar.selectbox("Baseline run", baselines, format_func=lambda a: label[a.key])
    adapted = st.sidebar.multiselect("Adapted runs", adapted_all, default=adapted_all[:1],
                                     format_func=lambda a: label[a.key])
    if not adapted:
        st.info("Choose at least one adapted run in the sidebar.")
        return
    names = {f"A{i}": a.label for i, a in enumerate(adapted, start=1)}
    for short, name in names.items():
        st.sidebar.markdown(f"**{short}**: {name}" + (" — :red[ORACLE: saw the target frames]" if "ORACLE" in name
                                                      else ""))
    rows = data.clip_rows(baseline, adapted)
    if not rows:
        st.warning("The chosen runs have no finished clip in common.")
        return
    measured = [m for m in data.METRICS if any(not math.isnan(r[f"baseline {m}"]) for r in rows)]
    metric = st.sidebar.radio("Metric", measured)
    rows = clip_table(rows, metric)
    if rows:
        plots(client, baseline, adapted, names, rows, metric)
        clip_view(client, baseline, adapted, names, rows)


def clip_table(rows: list[dict], metric: str) -> list[dict]:
    st.header("Clips")
    left, right = st.columns(2)
    classes = sorted({r["class"] for r in rows})
    chosen = left.multiselect("Classes", classes, default=classes)
    outcome = right.radio(f"Outcome (A1, {metric})", ["all", "helped", "hurt"], horizontal=True)
    shown = [r for r in rows if r["class"] in chosen and
             (outcome == "all" or data.helped(r, 1, metric) == (outcome == "helped"))]
    st.dataframe(shown, hide_index=True, use_container_width=True)
    st.caption(f"{len(shown)} of {len(rows)} clips; click a column header to sort. Δ = adapted − baseline.")
    return shown


def plots(client, baseline, adapted, names, rows, metric) -> None:
    st.header("Plots")
    clips = [r["clip"] for r in rows]
    stats = {short: data.arm_statistics(rows, i, metric) for i, short in enumerate(names, start=1)}
    means = [next(iter(stats.values()))["baseline_mean"]] + [s["adapted_mean"] for s in stats.values()]
    ses = [next(iter(stats.values()))["baseline_se"]] + [s["adapted_se"] for s in stats.values()]
    summary = [{"arm": f"{short}: {names[short]}", "n": s["n"], "Δ mean": s["diff_mean"], "95% CI low": s["ci_low"],
                "95% CI high": s["ci_high"], "t-test p": s["t_p_value"], "Wilcoxon p": s["wilcoxon_p_value"]}
               for short, s in stats.items()]
    st.dataframe(summary, hide_index=True, use_container_width=True)
    deltas = {short: [r[f"{short} Δ{metric}"] for r in rows] for short in names}
    a, b = st.columns(2)
    a.plotly_chart(figures.means_figure(["baseline", *names], means, ses, metric), key="means")
    b.plotly_chart(figures.difference_histogram(deltas, metric), key="histogram")
    a.plotly_chart(figures.scatter_figure([r[f"baseline {metric}"] for r in rows],
                                          {s: [r[f"{s} {metric}"] for r in rows] for s in names}, clips, metric),
                   key="scatter")
    curves = {"baseline": data.frame_curve(baseline, clips, metric)}
    curves.update({short: data.frame_curve(arm, clips, metric) for short, arm in zip(names, adapted)})
    first_frame = curves["baseline"]["frame"][0] if curves["baseline"]["frame"] else None
    b.plotly_chart(figures.frame_curves(curves, metric, first_frame), key="curves")
    seconds = [sum(r[f"{s} adapt s"] for r in rows) / len(rows) for s in names]
    a.plotly_chart(figures.cost_gain_figure(list(names), seconds, [stats[s]["diff_mean"] for s in names], metric),
                   key="cost")


def clip_view(client, baseline, adapted, names, rows) -> None:
    st.header("One clip")
    clip_id = st.selectbox("Clip", [r["clip"] for r in rows])
    runs = {"baseline": baseline.clips[clip_id], **{s: arm.clips[clip_id] for s, arm in zip(names, adapted)}}
    videos = {name: data.download_clip(client, run, CACHE) for name, run in runs.items()}
    missing = [name for name, v in videos.items() if v is None]
    if missing:
        st.warning(f"No video artifacts for {clip_id} in: {', '.join(missing)}.")
        return
    columns, context, fps = compose.clip_columns(videos)
    key = "-".join(r.info.run_id for r in runs.values())
    video = compose.side_by_side_video(columns, context, fps, CACHE / f"{key}.mp4")
    st.caption(" | ".join(columns) + f" — orange bar: the {context} context frames; blue bar: generated")
    st.video(video.read_bytes())
    total = len(columns["ground truth"])
    frame = st.slider("Frame", 0, total - 1, context, key="frame")
    per_frame = {name: {m: frame_history(run.info.run_id, m) for m in data.METRICS} for name, run in runs.items()}
    cells = st.columns(len(columns))
    for cell, (name, frames) in zip(cells, columns.items()):
        values = per_frame.get(name, {})
        note = "context" if frame < context else " ".join(f"{m} {values[m][frame]:.3f}" for m in data.METRICS
                                                          if frame in values.get(m, {}))
        cell.image(compose.upscale(frames[frame]), width=192, caption=" · ".join(filter(None, [name, f"frame {frame}",
                                                                                              note])))


main()
