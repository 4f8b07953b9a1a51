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

from pipeline.evaluation.stats import mean_se  # noqa: E402
from pipeline.tracking.runs import frame_curve, frame_history  # noqa: E402
from viewer import compose, data, figures, sweep  # noqa: E402

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
    evaluation = data.latest_evaluation(client)  # open on the latest comparison evaluated, if any
    opening = data.opening_choice(evaluation, experiments)
    experiment = st.sidebar.selectbox("Experiment", experiments, index=opening["experiment"] or 0,
                                      format_func=lambda e: e.name)
    if evaluation is not None and evaluation.info.experiment_id != experiment.experiment_id:
        evaluation = None  # another experiment was chosen: its own newest arms
    sweeps = sweep.list_sweeps(experiment.experiment_id)
    if sweeps and st.sidebar.radio("View", ["sweep", "arms and clips"],
                                   index=0 if sweep.opens_on_sweep(sweeps, evaluation) else 1) == "sweep":
        sweep.show(client, sweeps)
        return
    arms = data.list_arms(experiment.experiment_id)
    baselines = [a for a in arms if a.stage == "baseline"]
    adapted_all = [a for a in arms if a.stage == "adapt"]
    if not baselines or not adapted_all:
        st.info("This experiment needs a baseline and at least one adapt run to compare.")
        return
    reasons = {(b.key, a.key): data.why_not_comparable(b, a) for b in baselines for a in adapted_all}
    # open on the newest baseline that some adapted arm was made against
    first = next((i for i, b in enumerate(baselines) if any(not reasons[b.key, a.key] for a in adapted_all)), 0)
    evaluated = data.opening_choice(evaluation, experiments, baselines, adapted_all)
    baseline = st.sidebar.selectbox("Baseline run", baselines,
                                    index=first if evaluated["baseline"] is None else evaluated["baseline"],
                                    format_func=data.Arm.describe)
    comparable = [a for a in adapted_all if not reasons[baseline.key, a.key]]
    others = [a for a in adapted_all if reasons[baseline.key, a.key]]
    if others:
        st.sidebar.markdown("**Not comparable with this baseline** (setting: this baseline's value vs the arm's):\n"
                            + "\n".join(f"- {a.label} · {a.digest[:8]} — {reasons[baseline.key, a.key]}"
                                         for a in others))
    if not comparable:
        st.warning("No adapted run was made against this baseline with the same model weights; the sidebar "
                   "says why each is not comparable.")
        return
    default = [a for a in evaluated["adapted"] or [] if a in comparable] or comparable[:1]
    adapted = st.sidebar.multiselect("Adapted runs", comparable, default=default, format_func=data.Arm.describe)
    if not adapted:
        st.info("Choose at least one adapted run in the sidebar.")
        return
    names = {f"A{i}": a for i, a in enumerate(adapted, start=1)}
    for short, arm in names.items():
        mark = (" — :red[ORACLE: saw the target frames]" if arm.oracle else
                " — :orange[SHAM: adapted on another clip's context, a control]" if arm.sham else "")
        st.sidebar.markdown(f"**{short}**: {arm.label}{mark}  \nfailed clips: {len(arm.failed)} "
                            f"({arm.failure_rate:.0%} of {len(arm.clips) + len(arm.failed)})")
    rows = data.clip_rows(baseline, adapted)
    if not rows:
        st.warning("The chosen baseline has no finished clip.")
        return
    measured = [m for m in data.COMPARED if any(not math.isnan(r[f"baseline {m}"]) for r in rows)]
    metric = st.sidebar.radio("Metric", measured)
    rows, shown = clip_table(rows, metric)
    if rows:
        summary_and_plots(baseline, names, rows, metric)
        set_metrics(evaluation)
    if shown:
        clip_view(client, baseline, names, shown)


def clip_table(rows: list[dict], metric: str) -> tuple[list[dict], list[dict]]:
    """The clips of the chosen classes (what the statistics cover) and those of them shown (also by outcome)."""
    st.header("Clips")
    left, right = st.columns(2)
    classes = sorted({r["class"] for r in rows})
    chosen = left.multiselect("Classes", classes, default=classes)
    outcome = right.radio(f"Outcome (A1, {metric})", ["all", "helped", "hurt"], horizontal=True)
    rows = [r for r in rows if r["class"] in chosen]
    shown = [r for r in rows if outcome == "all" or data.outcome(r, 1, metric) == outcome]
    st.dataframe(shown, hide_index=True)
    st.caption(f"{len(shown)} of {len(rows)} clips the baseline scored; click a column header to sort. Δ = adapted "
               "− baseline. The outcome filter narrows this table and the clip below, not the statistics.")
    return rows, shown


def summary_and_plots(baseline: data.Arm, names: dict[str, data.Arm], rows: list[dict], metric: str) -> None:
    st.header("Summary")
    clips = [r["clip"] for r in rows]
    st.table(data.summary_rows(baseline, names, clips, metric), hide_index=True)
    st.caption(f"Over the {len(clips)} clips of the chosen classes the baseline scored; a clip's {metric} is the "
               f"mean over its {baseline.params.get('sampling.samples', '?')} samples. ITT (intention to treat): "
               "a clip the arm failed on counts as the baseline's value; complete case: the clips the arm finished. "
               "Holm: adjusted over the adapted arms shown. Clips the baseline failed on are in no comparison.")
    refs = data.references(baseline)
    base = data.baseline_values(baseline, clips, metric)
    references = {r.label: data.reference_values(baseline, r, clips, metric) for r in refs}
    itt = {short: data.arm_values(baseline, arm, clips, metric) for short, arm in names.items()}
    means, ses = zip(*(mean_se(list(v.values())) for v in (base, *references.values(), *itt.values())))
    a, b = st.columns(2)
    a.plotly_chart(figures.means_figure(["baseline", *references, *itt], list(means), list(ses), metric),
                   key="means")
    # per clip, what each arm actually produced: the clips it finished
    finished = {short: data.arm_values(baseline, arm, clips, metric, itt=False) for short, arm in names.items()}
    deltas = {short: [v - base[c] for c, v in values.items() if c in base] for short, values in finished.items()}
    b.plotly_chart(figures.difference_histogram(deltas, metric), key="histogram")
    a.plotly_chart(figures.scatter_figure(base, {**references, **finished}, metric), key="scatter")
    base_runs = [baseline.clips[c] for c in clips]
    curves = {"baseline": frame_curve(base_runs, metric)}
    curves.update({r.label: frame_curve(base_runs, f"{r.prefix}_{metric}") for r in refs})
    # like the statistics, under intention to treat: on a clip an arm failed, the baseline's own curve
    curves.update({short: frame_curve(list(data.itt_runs(baseline, arm, clips).values()), metric)
                   for short, arm in names.items()})
    first_frame = curves["baseline"]["frame"][0] if curves["baseline"]["frame"] else None
    b.plotly_chart(figures.frame_curves(curves, metric, first_frame), key="curves")
    seconds = [mean_se([r[f"{s} adapt s"] for r in rows if not math.isnan(r[f"{s} adapt s"])])[0] for s in names]
    gains = [data.compare(base, itt[s])["diff_mean"] for s in names]
    a.plotly_chart(figures.cost_gain_figure(list(names), seconds, gains, metric), key="cost")


def set_metrics(evaluation) -> None:
    """The metrics of an arm's whole set of clips (FVD), from the latest evaluate run of this experiment."""
    rows = data.set_metric_rows(evaluation)
    if rows:
        st.subheader("Over each arm's set of clips")
        st.table(rows, hide_index=True)
        st.caption(f"From the latest evaluate run ({evaluation.data.tags.get('mlflow.runName', '')}): its arms, not "
                   "necessarily those chosen in the sidebar. FVD is noisy below a few hundred clips.")


def clip_view(client: MlflowClient, baseline: data.Arm, names: dict[str, data.Arm], rows: list[dict]) -> None:
    st.header("One clip")
    clip_id = st.selectbox("Clip", [r["clip"] for r in rows])
    runs = {"baseline": baseline.clips[clip_id]}
    for short, arm in names.items():
        if run := data.finished_run(baseline, arm, clip_id):
            runs[short] = run
        else:
            st.info(f"{short} has no result on {clip_id}: {data.clip_result(baseline, arm, clip_id)}")
    videos = {name: data.download_clip(client, run, CACHE) for name, run in runs.items()}
    missing = [name for name, v in videos.items() if v is None]
    if missing:
        st.warning(f"No video artifacts for {clip_id} in: {', '.join(missing)}.")
        return
    columns, context, fps = compose.clip_columns(videos)
    key = "-".join(r.info.run_id for r in runs.values())
    video = compose.side_by_side_video(columns, context, fps, CACHE / f"{key}.mp4")
    st.caption(" | ".join(columns) + f" — orange bar: the {context} context frames; blue bar: generated. Each arm "
               f"shows the first of its {baseline.params.get('sampling.samples', '?')} samples; the metrics under "
               "the frames are the mean over them.")
    st.video(video.read_bytes())
    total = len(columns["ground truth"])
    frame = st.slider("Frame", 0, total - 1, context, key="frame")
    histories = {name: {m: frame_history(run.info.run_id, m) for m in data.COMPARED} for name, run in runs.items()}
    # after the context the context column holds its last frame: what the repeat-last predictor scored
    repeat = data.REPEAT_LAST
    histories["context"] = {f"{repeat.column} {m}": frame_history(runs["baseline"].info.run_id, f"{repeat.prefix}_{m}")
                            for m in data.COMPARED}
    cells = st.columns(len(columns))
    for cell, (name, frames) in zip(cells, columns.items()):
        values = histories.get(name, {})
        note = "context" if frame < context else " ".join(f"{label} {h[frame]:.3f}" for label, h in values.items()
                                                          if frame in h)
        cell.image(compose.upscale(frames[frame]), width=192, caption=" · ".join(filter(None, [name, f"frame {frame}",
                                                                                              note])))


main()
