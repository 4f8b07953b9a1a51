"""The evaluate stage: the arms of one config paired by clip, with their controls and failures.

Arms: the baseline, the adapted arm the config names, its sham control (the same settings with
adaptation.data=other) when that has been run, and the reference predictors the baseline stage
scored on every clip (the last context frame repeated; with a VAE, the target's VAE reconstruction).

Intention to treat: the primary comparisons keep every clip the baseline scored; a clip whose
adaptation failed is scored as the baseline's own continuation (no change) and counted as a failure.
The complete-case comparison (clips finished in both arms) is shown beside it. Every clip metric is
the mean over the clip's samples; best-of-N (the sample closest to the ground truth, as much of the
video-prediction literature reports) is a labelled secondary comparison.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from ..config import Config, ConfigError, eval_points
from ..data.manifest import read_manifest, select_clips
from ..evaluation.fvd import fvd
from ..evaluation.plots import summary_figure, write_html
from ..evaluation.registry import COMPARED, ON_TRUTH, REGISTRY, improved
from ..evaluation.stats import holm, mean_se, paired_comparison, paired_frame_difference, per_frame_curve
from ..evaluation.weights import FETCH_COMMAND, WEIGHTS
from ..tracking.runs import (TAG_ERROR, TAG_STAGE, TAG_WEIGHTS, finished_clips, frame_history, log_arms_record,
                             search_all, stage_run)
from .continuation import REFERENCE_LABELS, arm_label, arm_run_name, clip_inputs, stage_digest, step_arms
from ..tracking.recorder import FEATURES_FILE

PREFIX_METRICS = ("first_frame_psnr", "continuity_psnr")  # frame K against the truth, against frame K-1
COSTS = ("adapt_seconds", "sample_seconds", "adapt_steps_per_second", "non_model_share", "peak_gpu_memory_mb",
         "peak_rss_mb")


@dataclass
class Arm:
    """One arm's finished clip runs, their metrics by name, and its failures (clip -> reason)."""

    name: str
    label: str
    runs: dict[str, Run]
    failed: dict[str, str]
    scored: dict[str, dict[str, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.scored = {c: r.data.metrics for c, r in self.runs.items()}


def evaluate(config: Config) -> dict:
    d = config.data
    split = select_clips(read_manifest(d.manifest), d.split, 0)
    clips = select_clips(split, d.split, d.num_clips)
    sham_config = replace(config, adaptation=replace(config.adaptation, data="other"))
    digests = {"baseline": stage_digest(config, "baseline"), "adapt": stage_digest(config, "adapt")}
    with stage_run(config, "evaluate", digests["adapt"], f"evaluate {arm_run_name(config, 'adapt')}") as parent:
        experiment_id = parent.info.experiment_id
        adapted_run = _newest_stage_run(experiment_id, "adapt", digests["adapt"])
        if adapted_run is None:
            raise ConfigError(f"experiment '{config.experiment}' has no adapt run with this config (digest "
                              f"{digests['adapt']}): run the adapt stage with the same config and experiment first")
        # the results evaluated are those made with the weights of the arm's newest stage run (older
        # results of other weights are never mixed in)
        weights = adapted_run.data.tags.get(TAG_WEIGHTS, "")

        def load(name: str, stage: str, cfg: Config, label: str) -> Arm:
            digest, arm_inputs = stage_digest(cfg, stage), clip_inputs(cfg, stage, clips, split)
            done = finished_clips(experiment_id, stage, digest, arm_inputs, weights)
            failed = finished_clips(experiment_id, stage, digest, arm_inputs, weights, status="FAILED")
            return Arm(name, label, done,
                       {c: r.data.tags.get(TAG_ERROR, "failed") for c, r in failed.items() if c not in done})

        baseline = load("baseline", "baseline", config, arm_label(config, "baseline"))
        if not baseline.scored:
            raise ConfigError(f"experiment '{config.experiment}' has no finished baseline clip for this config "
                              f"(baseline digest {digests['baseline']}, model weights {weights}): run the baseline "
                              "stage with the same config and experiment")
        arms = [baseline, load("adapted", "adapt", config, arm_label(config, "adapt"))]
        if config.adaptation.data != "other" and len(split) > 1:  # a sham needs another clip
            sham = load("sham", "adapt", sham_config, arm_label(sham_config, "adapt"))
            if sham.scored or sham.failed:
                arms.append(sham)
        summary = summarise(config, arms, [c.clip_id for c in clips])
        summary["per_frame"] = per_frame(arms, summary)
        summary["sets"] = set_metrics(arms, summary["clips"], d.frames - d.context)
        if eval_points(config.adaptation):
            summary["step_curve"] = step_curve(config, summary, baseline, load, [c.clip_id for c in clips],
                                               experiment_id)
            log_arms_record({"adaptation.steps": [str(row["steps"]) for row in summary["step_curve"]]}, "psnr",
                            digests["baseline"], [{"arm": row["arm"], "digest": row["digest"],
                                                   "point": {"adaptation.steps": str(row["steps"])}}
                                                  for row in summary["step_curve"]])
        mlflow.set_tags({"tta.baseline_digest": digests["baseline"], "tta.adapt_digest": digests["adapt"],
                         TAG_WEIGHTS: weights})
        mlflow.log_metrics(flat_metrics(summary))
        stage_runs = {"baseline": _newest_stage_run(experiment_id, "baseline", digests["baseline"]),
                      "adapted": adapted_run}
        if "sham" in summary["arms"]:
            stage_runs["sham"] = _newest_stage_run(experiment_id, "adapt", stage_digest(sham_config, "adapt"))
        summary_on_stage_runs(summary, {name: run for name, run in stage_runs.items() if run is not None})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "metrics.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
            write_html(summary_figure(summary), Path(tmp) / "plots.html")
            mlflow.log_artifacts(tmp)
        summary["run_id"] = parent.info.run_id
    print(format_table(summary), flush=True)
    # MLflow 3's UI opens experiments on its GenAI overview unless the link asks for the runs table
    print(f"in the MLflow UI (`mlflow ui`): /#/experiments/{experiment_id}/runs?workflowType=machine_learning; "
          "the viewer: `make viewer`", flush=True)
    return summary


def _newest_stage_run(experiment_id: str, stage: str, digest: str) -> Run | None:
    runs = search_all(experiment_id, f"tags.`{TAG_STAGE}` = '{stage}' and tags.`tta.digest` = '{digest}' "
                                     "and tags.`tta.kind` = 'stage'", order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def summary_on_stage_runs(summary: dict, stage_runs: dict[str, Run]) -> None:
    """Each arm's own figures on its newest stage run, under the same names for every arm (`eval.psnr_mean`,
    `eval.psnr_gain` with `_ci_low`/`_ci_high`/`_p` against the baseline, ITT; failures; seconds per
    clip), so MLflow's compare view and charts line arms up without opening the evaluate run."""
    client, now = MlflowClient(), int(time.time() * 1000)
    for name, run in stage_runs.items():
        arm = summary["arms"][name]
        metrics = {f"eval.{m}_mean": mean for m, (mean, _) in arm["means"].items()}
        metrics.update({"eval.clips_failed": arm["failed"], "eval.failure_rate": arm["failure_rate"]})
        metrics.update({f"eval.{m}": result["arms"][name]["value"] for m, result in summary["sets"].items()})
        metrics.update({f"eval.{k.split('.', 1)[1]}": v for k, v in summary["cost"].items() if k.startswith(name + ".")})
        for row in summary["comparisons"]:
            if row["a"] == name and row["b"] == "baseline" and _analysis_key(row["analysis"]) == "itt":
                gain = f"eval.{row['metric']}_gain"
                metrics.update({gain: row["diff_mean"], f"{gain}_ci_low": row["ci_low"],
                                f"{gain}_ci_high": row["ci_high"], f"{gain}_p": row["t_p_value"]})
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0)
                                                   for k, v in metrics.items() if not math.isnan(float(v))])


def step_curve(config: Config, summary: dict, baseline: Arm, load, clip_ids: list[str], experiment_id: str
               ) -> list[dict]:
    """adaptation.eval_at: each number of steps (an arm of its own, recorded by the same adaptation)
    against the baseline, ITT, with its adaptation seconds per clip; `summary` is the last step's.
    Each earlier step's figures also go on its own stage run, as evaluate does for the arm it names."""
    rows = []
    for steps, arm_config in sorted(step_arms(config, "adapt").items()):
        point = summary
        if steps != config.adaptation.steps:
            point = summarise(arm_config, [baseline, load("adapted", "adapt", arm_config,
                                                          arm_label(arm_config, "adapt"))], clip_ids)
            run = _newest_stage_run(experiment_id, "adapt", stage_digest(arm_config, "adapt"))
            if run is not None:
                summary_on_stage_runs({**point, "sets": {}}, {"adapted": run})
        gains = {row["metric"]: {k: row[k] for k in ("n", "diff_mean", "ci_low", "ci_high", "t_p_value")}
                 for row in point["comparisons"]
                 if (row["a"], row["b"]) == ("adapted", "baseline") and _analysis_key(row["analysis"]) == "itt"}
        rows.append({"steps": steps, "arm": arm_run_name(arm_config, "adapt"),
                     "digest": stage_digest(arm_config, "adapt"), "failed": point["arms"]["adapted"]["failed"],
                     "adapt_seconds": point["cost"].get("adapted.adapt_seconds", math.nan), "gains": gains})
    return rows


def format_step_curve(rows: list[dict]) -> list[str]:
    metrics = list(rows[0]["gains"])
    lines = ["step curve (adaptation.eval_at): each number of steps is an arm of its own, taken from one adaptation "
             "per clip; gain over the baseline, ITT, mean [95% CI] (t p not adjusted over the curve's points)",
             f"{'steps':>7}{'adapt s/clip':>14}{'failed':>8}" + "".join(f"{m + ' gain':>30}" for m in metrics)]
    for row in rows:
        cells = []
        for m in metrics:
            g = row["gains"][m]
            cells.append(f"{g['diff_mean']:+.4f} [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]" if g["n"] >= 2
                         else "fewer than 2 clips")
        lines.append(f"{row['steps']:>7}{row['adapt_seconds']:>14.2f}{row['failed']:>8}"
                     + "".join(f"{c:>30}" for c in cells))
    return lines


def summarise(config: Config, arms: list[Arm], clip_ids: list[str]) -> dict:
    """Arms, failures and paired comparisons over the clips the baseline scored (`clip_ids` in order)."""
    baseline = arms[0]
    itt = [c for c in clip_ids if c in baseline.scored]
    names = [m for m in COMPARED if all(m in baseline.scored[c] for c in itt)]
    references = [ref for ref in REFERENCE_LABELS if all(f"{ref}_psnr" in baseline.scored[c] for c in itt)]
    summary = {
        "title": f"{config.experiment}: {arms[1].label} vs baseline, {len(itt)} clips the baseline scored",
        "oracle": config.adaptation.data == "oracle",
        "samples": config.sampling.samples,
        "clips": itt,
        "arms": {},
        "comparisons": [],
        "excluded": {c: _why_excluded(c, baseline) for c in clip_ids if c not in baseline.scored},
        "cost": {},
    }
    for arm in arms:
        summary["arms"][arm.name] = {
            "label": arm.label, "scored": sum(c in arm.scored for c in itt), "failed": sum(c in arm.failed for c in itt),
            "not_run": sum(c not in arm.scored and c not in arm.failed for c in itt),
            "failures": {c: arm.failed[c] for c in itt if c in arm.failed},
            "means": {m: mean_se([v for c in itt if (v := _itt_value(arm, baseline, c, m)) is not None])
                      for m in names}}
        summary["arms"][arm.name]["failure_rate"] = summary["arms"][arm.name]["failed"] / max(1, len(itt))
    for ref in references:
        summary["arms"][ref] = {"label": REFERENCE_LABELS[ref], "scored": len(itt), "failed": 0, "not_run": 0,
                                "failures": {}, "failure_rate": 0.0,
                                "means": {m: mean_se([baseline.scored[c][f"{ref}_{m}"] for c in itt]) for m in names}}
    treated = arms[1:]
    rows = []
    for arm in treated:
        rows.append((arm.name, "baseline", "ITT: a failed clip counts as no change", lambda a, c, m, arm=arm:
                     (_itt_value(arm, baseline, c, m), baseline.scored[c][m])))
        rows.append((arm.name, "baseline", "complete case", lambda a, c, m, arm=arm:
                     (arm.scored[c][m], baseline.scored[c][m]) if c in arm.scored else (None, None)))
    if len(treated) == 2:
        adapted, sham = treated
        rows.append(("adapted", "sham", "ITT: a failed clip counts as no change", lambda a, c, m:
                     (_itt_value(adapted, baseline, c, m), _itt_value(sham, baseline, c, m))))
    for ref in references:
        for arm in (baseline, treated[0]):
            rows.append((arm.name, ref, "ITT: a failed clip counts as no change", lambda a, c, m, arm=arm, ref=ref:
                         (_itt_value(arm, baseline, c, m), baseline.scored[c][f"{ref}_{m}"])))
    if config.sampling.samples > 1:
        arm = treated[0]
        rows.append((arm.name, "baseline", f"best of {config.sampling.samples} samples, picked with the ground "
                     "truth; complete case", lambda a, c, m, arm=arm:
                     (arm.scored[c].get(f"{m}_best"), baseline.scored[c].get(f"{m}_best")) if c in arm.scored
                     else (None, None)))
    for a, b, analysis, values in rows:
        for m in names:
            pairs = [values(a, c, m) for c in itt]
            kept = [(c, x, y) for c, (x, y) in zip(itt, pairs) if x is not None and y is not None]
            stats = paired_comparison([y for _, _, y in kept], [x for _, x, _ in kept])
            stats.update(a=a, b=b, analysis=analysis, metric=m, clips=[c for c, _, _ in kept],
                         differences=[x - y for _, x, y in kept], better=_better(m, stats["diff_mean"]))
            summary["comparisons"].append(stats)
    for row, p in zip(summary["comparisons"], holm([r["t_p_value"] for r in summary["comparisons"]])):
        row["holm_p_value"] = p
    summary["prefix"] = {arm.name: {m: _mean_se_where(arm, itt, m) for m in PREFIX_METRICS} for arm in arms}
    summary["prefix"]["truth"] = {"first_frame_psnr": (math.nan, math.nan),
                                  "continuity_psnr": _mean_se_where(baseline, itt, "truth_continuity_psnr")}
    # how much each continuation moves from frame to frame, beside how much the truth does
    summary["motion"] = {arm.name: {m: _mean_se_where(arm, itt, m) for m in ON_TRUTH} for arm in arms}
    summary["motion"]["truth"] = {m: _mean_se_where(baseline, itt, f"truth_{m}") for m in ON_TRUTH}
    for arm in arms:
        for cost in COSTS:
            values = [arm.scored[c][cost] for c in itt if c in arm.scored and cost in arm.scored[c]]
            if values:
                summary["cost"][f"{arm.name}.{cost}"] = mean_se(values)[0]
    # what an arm's adaptation buys per minute of it on its device, so that methods compare at their cost
    for row in summary["comparisons"]:
        minutes = summary["cost"].get(f"{row['a']}.adapt_seconds", 0.0) / 60
        if row["b"] == "baseline" and _analysis_key(row["analysis"]) == "itt" and minutes > 0:
            summary["cost"][f"{row['a']}.{row['metric']}_gain_per_adapt_minute"] = row["diff_mean"] / minutes
    return summary


def _mean_se_where(arm: Arm, clips: list[str], metric: str) -> tuple[float, float]:
    """Over the clips whose run has the metric (runs recorded by an older version may not)."""
    return mean_se([arm.scored[c][metric] for c in clips if metric in arm.scored.get(c, {})])


def _itt_value(arm: Arm, baseline: Arm, clip: str, metric: str) -> float | None:
    """The arm's value for a clip the baseline scored; the baseline's when the arm failed on it (no
    change); None when the arm has not run it yet."""
    if clip in arm.scored:
        return arm.scored[clip][metric]
    return baseline.scored[clip][metric] if clip in arm.failed else None


def _why_excluded(clip: str, baseline: Arm) -> str:
    if clip in baseline.failed:
        return f"the baseline failed on it: {baseline.failed[clip]}"
    return "no finished baseline result (not run yet, or made from other frames or weights)"


def _better(metric: str, diff: float) -> str:
    if math.isnan(diff) or diff == 0:
        return "no change"
    return "better" if improved(metric, diff) else "worse"


def set_metrics(arms: list[Arm], clips: list[str], frames: int) -> dict:
    """FVD of each arm over the clips every arm finished (all their samples) against the truth's
    continuations of the same clips; {} when a run has no I3D features (no weights when it ran)."""
    shared = [c for c in clips if all(c in arm.runs for arm in arms)]
    features = {arm.name: [_clip_features(arm.runs[c]) for c in shared] for arm in arms}
    if not shared or any(f is None for clip_features in features.values() for f in clip_features):
        return {}
    real = np.concatenate([f["truth_i3d"] for f in features["baseline"]])
    return {"fvd": {"clips": len(shared), "frames": frames, "network": WEIGHTS["i3d"].network, "arms": {
        name: {"value": fvd(np.concatenate([f["i3d"] for f in clip_features]), real),
               "videos": sum(len(f["i3d"]) for f in clip_features)} for name, clip_features in features.items()}}}


def _clip_features(run: Run) -> dict[str, np.ndarray] | None:
    client = MlflowClient()
    if f"clip/{FEATURES_FILE}" not in {a.path for a in client.list_artifacts(run.info.run_id, "clip")}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with np.load(client.download_artifacts(run.info.run_id, f"clip/{FEATURES_FILE}", tmp)) as saved:
            return dict(saved)


def per_frame(arms: list[Arm], summary: dict) -> dict:
    """Per metric: each arm's mean ± SE per frame, and the paired per-frame difference of every
    treated arm minus the baseline (ITT, 95% CI), so a user sees at which horizon adaptation helps or
    hurts."""
    baseline, itt = arms[0], summary["clips"]
    out = {}
    for m in next(iter(summary["arms"].values()))["means"]:
        histories = {c: frame_history(baseline.runs[c].info.run_id, m) for c in itt}
        frames = sorted(next(iter(histories.values())))
        rows = {"baseline": [[histories[c][f] for f in frames] for c in itt]}
        for ref in (r for r in REFERENCE_LABELS if r in summary["arms"]):
            rows[ref] = [[frame_history(baseline.runs[c].info.run_id, f"{ref}_{m}")[f] for f in frames] for c in itt]
        differences = {}
        for arm in arms[1:]:
            paired = [c for c in itt if c in arm.runs or c in arm.failed]
            treated = {c: frame_history(arm.runs[c].info.run_id, m) if c in arm.runs else histories[c] for c in paired}
            rows[arm.name] = [[treated[c][f] for f in frames] for c in paired]
            differences[f"{arm.name} - baseline"] = {
                "frame": frames, "n": len(paired), **paired_frame_difference(
                    [[histories[c][f] for f in frames] for c in paired], rows[arm.name])}
        curves = {}
        for name, values in rows.items():
            mean, se = per_frame_curve(values) if values else ([], [])
            curves[name] = {"frame": frames, "mean": mean, "se": se}
        out[m] = {"arms": curves, "differences": differences}
    return out


def flat_metrics(summary: dict) -> dict[str, float]:
    """The summary as MLflow metrics: each arm's means and failures, each comparison's statistics."""
    out = {}
    for name, arm in summary["arms"].items():
        out.update({f"{name}.clips_failed": arm["failed"], f"{name}.failure_rate": arm["failure_rate"],
                    f"{name}.clips_not_run": arm["not_run"]})
        for m, (mean, se) in arm["means"].items():
            out.update({f"{name}.{m}_mean": mean, f"{name}.{m}_se": se})
    for m, result in summary["sets"].items():
        out.update({f"{name}.{m}": arm["value"] for name, arm in result["arms"].items()})
        out[f"{m}.clips"] = result["clips"]
    for row in summary["comparisons"]:
        key = f"{row['a']}-{row['b']}.{_analysis_key(row['analysis'])}.{row['metric']}"
        for stat in ("n", "diff_mean", "ci_low", "ci_high", "t_p_value", "holm_p_value", "wilcoxon_p_value"):
            out[f"{key}.{stat}"] = row[stat]
    for block in ("prefix", "motion"):
        for name, values in summary[block].items():
            out.update({f"{name}.{m}_mean": mean for m, (mean, _) in values.items()})
    out.update({k: v for k, v in summary["cost"].items()})
    out["clips_scored_by_baseline"] = len(summary["clips"])
    return {k: float(v) for k, v in out.items() if not math.isnan(v)}


def _analysis_key(analysis: str) -> str:
    return "itt" if analysis.startswith("ITT") else "best_of_n" if analysis.startswith("best") else "complete_case"


def format_table(summary: dict) -> str:
    metrics = list(next(iter(summary["arms"].values()))["means"])
    lines = [summary["title"] + (" [ORACLE upper bound]" if summary["oracle"] else ""),
             f"each clip's metric is the mean over its {summary['samples']} sample(s); ± is the SE over clips", ""]
    lines.append(f"{'arm':<13}{'scored':>7}{'failed':>9}" + "".join(f"{m:>19}" for m in metrics))
    for name, arm in summary["arms"].items():
        failed = f"{arm['failed']} ({arm['failure_rate']:.0%})" if name not in REFERENCE_LABELS else "-"
        lines.append(f"{name:<13}{arm['scored']:>7}{failed:>9}" + "".join(f"{_pm(*arm['means'][m]):>19}"
                                                                        for m in metrics))
    lines += [f"  {name}: {arm['label']}" for name, arm in summary["arms"].items() if arm['label'] != name]
    lines += [f"{m.name}: {m.definition}" for m in REGISTRY if m.weights and m.name in metrics]
    lines += [f"{m.name} unavailable (see the stage runs' tta.{m.name} tag; `{FETCH_COMMAND}`)" for m in REGISTRY
              if m.weights and m.name not in metrics and m.name not in summary["sets"]]
    lines += ["", f"{'paired comparison':<44}{'analysis':<16}{'metric':<11}{'n':>4}{'mean [95% CI]':>32}"
                  f"{'t p':>9}{'Holm p':>9}{'Wilcoxon p':>11}"]
    for row in summary["comparisons"]:
        if row["n"] < 2:
            lines.append(f"{row['a'] + ' - ' + row['b']:<44}{_analysis_key(row['analysis']):<16}{row['metric']:<11}"
                         f"{row['n']:>4}  fewer than 2 paired clips: no statistics")
            continue
        lines.append(f"{row['a'] + ' - ' + row['b']:<44}{_analysis_key(row['analysis']):<16}{row['metric']:<11}"
                     f"{row['n']:>4}{row['diff_mean']:>+12.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
                     f"{row['t_p_value']:>9.3g}{row['holm_p_value']:>9.3g}{row['wilcoxon_p_value']:>11.3g}")
    lines.append("itt: every clip the baseline scored, a failed adaptation counted as no change; "
                 "complete_case: clips finished in both arms; best_of_n: oracle selection, not a prediction")
    lines += ["", "does the prefix condition the model? PSNR of the first generated frame (K) against the truth "
                  "and against the last context frame (K-1):"]
    for name, values in summary["prefix"].items():
        if name == "truth":
            lines.append(f"  {'truth':<12}frame K against frame K-1: {_pm(*values['continuity_psnr'])} (how much a "
                         "real clip changes in one frame)")
        else:
            lines.append(f"  {name:<12}against the truth {_pm(*values['first_frame_psnr'])}, against frame K-1 "
                         f"{_pm(*values['continuity_psnr'])}")
    lines += ["", "how much does each continuation move? mean change between consecutive frames (flicker) and "
                  "what optical flow does not explain of it (warp error), 0-1 scale, frame K against K-1 included:"]
    for name, values in summary["motion"].items():
        lines.append(f"  {name:<12}flicker {_pm(*values['flicker'])}, warp error {_pm(*values['warp_error'])}")
    for m, result in summary["sets"].items():
        lines += ["", f"{m} ({result['network']}) over the {result['clips']} clips every arm finished, "
                      f"{result['frames']} frames each, every sample, against the truth's continuations of the same "
                      f"clips; noisy below a few hundred clips:"]
        lines += [f"  {name:<12}{arm['value']:.2f} ({arm['videos']} videos)" for name, arm in result["arms"].items()]
    lines.append("")
    cost = summary["cost"]
    lines.append(f"seconds per clip: adaptation {cost.get('adapted.adapt_seconds', 0):.2f}, sampling baseline "
                 f"{cost.get('baseline.sample_seconds', math.nan):.2f} / adapted "
                 f"{cost.get('adapted.sample_seconds', math.nan):.2f} (all samples)")
    gains = {k.split(".", 1)[1].removesuffix("_gain_per_adapt_minute"): v for k, v in cost.items()
             if k.startswith("adapted.") and k.endswith("_gain_per_adapt_minute")}
    if gains:
        lines.append("gain over the baseline per minute of adaptation per clip: "
                     + ", ".join(f"{m} {v:+.4g}" for m, v in gains.items()))
    for key, what in (("peak_gpu_memory_mb", "GPU memory allocated"), ("peak_rss_mb", "the process's resident set")):
        if f"baseline.{key}" in cost or f"adapted.{key}" in cost:
            lines.append(f"peak memory ({what}), MB: baseline {cost.get(f'baseline.{key}', math.nan):.0f} / adapted "
                         f"{cost.get(f'adapted.{key}', math.nan):.0f}")
    lines.append(f"share of a clip's wall time outside the model (loading, scoring, recording): baseline "
                 f"{cost.get('baseline.non_model_share', math.nan):.1%} / adapted "
                 f"{cost.get('adapted.non_model_share', math.nan):.1%}")
    if summary.get("step_curve"):
        lines += ["", *format_step_curve(summary["step_curve"])]
    for name, arm in summary["arms"].items():
        for clip, reason in sorted(arm["failures"].items()):
            lines.append(f"{name} failed on {clip}: {reason}")
    for clip, reason in sorted(summary["excluded"].items()):
        lines.append(f"excluded {clip}: {reason}")
    return "\n".join(lines)


def _pm(mean: float, se: float) -> str:
    return f"{mean:.4f} ± {se:.4f}" if not math.isnan(se) else f"{mean:.4f}"
