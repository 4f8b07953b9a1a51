"""The sweep view: every arm of a sweep (`python -m pipeline sweep`) or of a step curve
(`adaptation.eval_at`) in one table ranked by its paired gain, the gain against each swept setting,
and against the adaptation's seconds per clip.

A run's arms record (`sweep.json`, `log_arms_record`) names its grid and each arm's digest; the figures are those
`evaluate` put on each arm's stage run (`eval.<metric>_gain` with its CI and p, ITT), so the table
shows what evaluate computed, for any metric it compared.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import streamlit as st
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.evaluation.registry import LOWER_IS_BETTER
from pipeline.tracking.runs import ARMS_RECORD, TAG_ARMS_RECORD, TAG_DIGEST, TAG_KIND, TAG_STAGE, search_all
from viewer import figures


def list_sweeps(experiment_id: str) -> list[Run]:
    """The experiment's finished runs that list arms to show together, newest first: sweeps, and the
    evaluations of a step curve (adaptation.eval_at)."""
    found = {r.info.run_id: r for where in (f"tags.`{TAG_STAGE}` = 'sweep'", f"tags.`{TAG_ARMS_RECORD}` = 'true'")
             for r in search_all(experiment_id, f"{where} and attributes.status = 'FINISHED'")}
    return sorted(found.values(), key=lambda r: r.info.end_time, reverse=True)


def opens_on_sweep(sweeps: list[Run], evaluation: Run | None) -> bool:
    """Whether the newest sweep (or step curve) ended after the latest evaluation outside it (a sweep's own
    evaluations end before the sweep does; a step curve's is its own)."""
    return bool(sweeps) and (evaluation is None or sweeps[0].info.end_time >= evaluation.info.end_time)


def load_record(client: MlflowClient, run: Run) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run.info.run_id, ARMS_RECORD, tmp)).read_text())


def arm_rows(experiment_id: str, record: dict, metric: str) -> list[dict]:
    """One row per arm of the sweep: its swept settings and evaluate's figures for `metric` from the arm's
    newest stage run that has them, best gain first (arms not evaluated on `metric` last)."""
    rows = []
    for arm in record["arms"]:
        runs = search_all(experiment_id, f"tags.`{TAG_STAGE}` = 'adapt' and tags.`{TAG_DIGEST}` = '{arm['digest']}' "
                                         f"and tags.`{TAG_KIND}` = 'stage'", order_by=["attributes.start_time DESC"])
        gain = f"eval.{metric}_gain"
        m = next((r.data.metrics for r in runs if gain in r.data.metrics), {})
        rows.append({"arm": arm["arm"], **arm["point"], f"Δ{metric} (ITT)": m.get(gain, math.nan),
                     "CI low": m.get(gain + "_ci_low", math.nan), "CI high": m.get(gain + "_ci_high", math.nan),
                     "t-test p": m.get(gain + "_p", math.nan), "failed": m.get("eval.clips_failed", math.nan),
                     "adapt s per clip": m.get("eval.adapt_seconds", math.nan)})
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(rows, key=lambda r: (math.isnan(r[f"Δ{metric} (ITT)"]), sign * r[f"Δ{metric} (ITT)"]))


def gain_metrics(experiment_id: str, record: dict) -> list[str]:
    """The metrics evaluate compared on the sweep's first arm (psnr first)."""
    runs = search_all(experiment_id, f"tags.`{TAG_DIGEST}` = '{record['arms'][0]['digest']}' and "
                                     f"tags.`{TAG_STAGE}` = 'adapt' and tags.`{TAG_KIND}` = 'stage'")
    names = {k[len("eval."):-len("_gain")] for r in runs for k in r.data.metrics
             if k.startswith("eval.") and k.endswith("_gain")}
    return sorted(names, key=lambda n: (n != "psnr", n))


def show(client: MlflowClient, sweeps: list[Run]) -> None:
    run = st.sidebar.selectbox("Sweep or step curve", sweeps, format_func=lambda r: r.info.run_name)
    kind = "sweep" if run.data.tags.get(TAG_STAGE) == "sweep" else "step curve"
    st.header(kind.capitalize())
    if kind == "step curve":
        st.caption("adaptation.eval_at: each number of steps is an arm of its own, taken from one adaptation per "
                   "clip (bit for bit the arm of that many steps run alone)")
    record = load_record(client, run)
    metric = st.sidebar.radio("Metric", gain_metrics(run.info.experiment_id, record) or [record["metric"]])
    rows = arm_rows(run.info.experiment_id, record, metric)
    st.table([{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows], hide_index=True)
    st.caption(f"{len(rows)} arms against one baseline, best first: the mean paired Δ{metric} over the clips the "
               "baseline scored, a clip the arm failed on counting as no change (ITT), with its 95% CI, as `evaluate` "
               "computed it.")
    charts = [(f"{kind}-{key}", figures.gain_by_setting(rows, key, record["grid"], metric, kind))
              for key in record["grid"]]
    charts.append((f"{kind}-cost", figures.cost_gain_figure([r["arm"] for r in rows],
                                                            [r["adapt s per clip"] for r in rows],
                                                            [r[f"Δ{metric} (ITT)"] for r in rows], metric)))
    columns = st.columns(2)
    for i, (key, chart) in enumerate(charts):
        columns[i % 2].plotly_chart(chart, key=key)
