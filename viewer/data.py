"""What the viewer reads from the tracking store, through the MLflow client API only (read-only).

An arm is one stage (baseline or adapt) at one config digest and one set of model weights: all its clip
runs, whichever invocation (parent run) produced them. An adapted arm is compared only with the baseline
it was made against (its tta.baseline_digest, the same weights), and only on clips whose results were
made from the same frames (tta.inputs).

Intention to treat: the statistics of an adapted arm keep every clip the baseline scored; a clip the arm
failed on counts as the baseline's own value (no change). The complete case (clips the arm finished) is
given beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.config import NOT_RESULT_SETTINGS
from pipeline.evaluation.registry import COMPARED, FRAME_METRICS, ON_TRUTH, SET_METRICS, improved
from pipeline.evaluation.stats import holm, mean_se, paired_comparison
from pipeline.tracking.runs import (TAG_CLASS, TAG_DIGEST, TAG_ERROR, TAG_INPUTS, TAG_KIND, TAG_STAGE, TAG_WEIGHTS,
                                    finished_clips, search_all)

CLIP_ARTIFACTS = ("context.mp4", "target.mp4", "output.mp4")
# what a baseline and an adapted arm must share to be compared (adaptation.* is what differs)
COMPARED_SECTIONS = ("data", "model", "sampling", "evaluation")


@dataclass(frozen=True)
class Reference:
    """A predictor the baseline stage scores on every clip, like an arm, as metrics `<prefix>_<metric>`."""

    prefix: str
    column: str  # in the clip table
    label: str  # in the plots and the summary


# short names for the predictors the baseline stage logs (pipeline.stages.continuation.REFERENCE_LABELS)
REPEAT_LAST = Reference("repeat_last", "repeat last", "repeat last frame (no model)")
REFERENCES = (REPEAT_LAST, Reference("linear_motion", "linear motion", "last frames' motion continued (no model)"),
              Reference("vae_recon", "VAE recon", "VAE recon of the target (the VAE's ceiling)"))


@dataclass
class Arm:
    stage: str
    digest: str
    weights: str  # fingerprint of the model weights loaded
    baseline_digest: str  # the baseline it is comparable with
    label: str
    params: dict[str, str]  # of its newest stage run
    clips: dict[str, Run] = field(default_factory=dict)  # finished clip runs by clip id
    failed: dict[str, Run] = field(default_factory=dict)  # FAILED clip runs of clips with no finished run

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.digest}:{self.weights}"

    @property
    def oracle(self) -> bool:
        return "ORACLE" in self.label

    @property
    def sham(self) -> bool:
        return "SHAM" in self.label

    @property
    def failure_rate(self) -> float:
        return len(self.failed) / max(1, len(self.clips) + len(self.failed))

    def value(self, clip_id: str, metric: str) -> float:
        return self.clips[clip_id].data.metrics.get(metric, math.nan)

    def describe(self) -> str:
        return (f"{self.label} · {len(self.clips)} clips · {len(self.failed)} failed ({self.failure_rate:.0%})"
                f" · {self.digest[:8]}")


def latest_evaluation(client: MlflowClient) -> Run | None:
    """The newest finished evaluate run of any experiment: the comparison the viewer opens on."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{TAG_STAGE}` = 'evaluate' and attributes.status = 'FINISHED'",
                              order_by=["attributes.end_time DESC"], max_results=1) if experiments else []
    return runs[0] if runs else None


def opening_choice(evaluation: Run | None, experiments: list, baselines: list[Arm] | None = None,
                   adapted: list[Arm] | None = None) -> dict:
    """Which experiment, baseline and adapted arms to open on: those of the latest evaluation, when it
    is in the list (else None, meaning the first)."""
    if evaluation is None:
        return {"experiment": None, "baseline": None, "adapted": None}
    tags = evaluation.data.tags
    experiment = next((i for i, e in enumerate(experiments) if e.experiment_id == evaluation.info.experiment_id), None)
    baseline = next((i for i, b in enumerate(baselines or []) if b.digest == tags.get("tta.baseline_digest")), None)
    chosen = [a for a in adapted or [] if a.digest == tags.get("tta.adapt_digest")]
    return {"experiment": experiment, "baseline": baseline, "adapted": chosen or None}


def list_experiments(client: MlflowClient) -> list:
    """Experiments that hold at least one baseline or adapt stage run."""
    return [e for e in client.search_experiments() if _stage_runs(e.experiment_id)]


def _stage_runs(experiment_id: str) -> list[Run]:
    found = search_all(experiment_id, f"tags.`{TAG_KIND}` = 'stage'", order_by=["attributes.start_time DESC"])
    return [r for r in found if r.data.tags.get(TAG_STAGE) in ("baseline", "adapt")]


def list_arms(experiment_id: str) -> list[Arm]:
    """One arm per (stage, digest, weights), newest first, with its finished and failed clip runs;
    an arm with no clip recorded yet (just started, or killed before its first clip) is left out."""
    arms: dict[str, Arm] = {}
    for run in _stage_runs(experiment_id):
        tags = run.data.tags
        arm = Arm(tags[TAG_STAGE], tags[TAG_DIGEST], tags.get(TAG_WEIGHTS, ""), tags.get("tta.baseline_digest", ""),
                  tags.get("tta.arm", tags[TAG_STAGE]), run.data.params)
        arms.setdefault(arm.key, arm)
    for arm in arms.values():
        arm.clips = finished_clips(experiment_id, arm.stage, arm.digest, weights=arm.weights)
        failed = finished_clips(experiment_id, arm.stage, arm.digest, weights=arm.weights, status="FAILED")
        arm.failed = {c: r for c, r in failed.items() if c not in arm.clips}
    return [arm for arm in arms.values() if arm.clips or arm.failed]


def why_not_comparable(baseline: Arm, arm: Arm) -> str:
    """'' when the adapted arm was made against this baseline with the same weights; otherwise why
    not, in words: the settings that differ (baseline's value vs the arm's), or other model weights."""
    reasons = [] if arm.weights == baseline.weights else ["other model weights"]
    if arm.baseline_digest != baseline.digest:
        keys = sorted({k for k in (*baseline.params, *arm.params) if k.split(".")[0] in COMPARED_SECTIONS
                       and k not in NOT_RESULT_SETTINGS and baseline.params.get(k) != arm.params.get(k)})
        reasons += [f"{k}: {baseline.params.get(k, 'unset')} vs {arm.params.get(k, 'unset')}" for k in keys] or [
            f"made against baseline {arm.baseline_digest[:8] or '(not recorded)'}, not {baseline.digest[:8]}"]
    return "; ".join(reasons)


def same_frames(baseline_run: Run, run: Run) -> bool:
    """The run's result was made from the frames of the baseline's (the sham arm's inputs name the
    clip's own hash, then its partner's)."""
    own = run.data.tags.get(TAG_INPUTS, "").split("+")[0]
    return bool(own) and own == baseline_run.data.tags.get(TAG_INPUTS)


def finished_run(baseline: Arm, arm: Arm, clip_id: str) -> Run | None:
    """The arm's finished run on a clip the baseline scored, if made from the same frames."""
    run = arm.clips.get(clip_id)
    return run if run is not None and same_frames(baseline.clips[clip_id], run) else None


def failed_run(baseline: Arm, arm: Arm, clip_id: str) -> Run | None:
    run = arm.failed.get(clip_id)
    return run if run is not None and same_frames(baseline.clips[clip_id], run) else None


def clip_result(baseline: Arm, arm: Arm, clip_id: str) -> str:
    """What the arm has on a clip the baseline scored, in words."""
    if finished_run(baseline, arm, clip_id):
        return "finished"
    if failed := failed_run(baseline, arm, clip_id):
        return f"failed: {failed.data.tags.get(TAG_ERROR, '')}"
    if clip_id in arm.clips or clip_id in arm.failed:
        return "not paired: made from other frames"
    return "not run"


def itt_runs(baseline: Arm, arm: Arm, clip_ids: list[str]) -> dict[str, Run]:
    """clip -> the run that stands for the arm on it under intention to treat: its own where it
    finished, the baseline's where it failed (no change); clips it has not run are left out."""
    out = {}
    for c in clip_ids:
        if run := finished_run(baseline, arm, c):
            out[c] = run
        elif failed_run(baseline, arm, c):
            out[c] = baseline.clips[c]
    return out


def references(baseline: Arm) -> list[Reference]:
    """The reference predictors the baseline scored (the VAE's only for models with one)."""
    return [r for r in REFERENCES if any(f"{r.prefix}_psnr" in run.data.metrics for run in baseline.clips.values())]


def clip_rows(baseline: Arm, adapted: list[Arm]) -> list[dict]:
    """One row per clip the baseline scored: its metrics, the reference predictors', and each adapted
    arm's (NaN where the arm has no paired result, with the reason under `A<i> result`)."""
    refs = references(baseline)
    rows = []
    for clip_id, run in sorted(baseline.clips.items()):
        row = {"clip": clip_id, "class": run.data.tags.get(TAG_CLASS, "")}
        row.update({f"baseline {m}": baseline.value(clip_id, m) for m in FRAME_METRICS})
        # the truth's own frame-to-frame change, what the arms' temporal consistency reads against
        row.update({f"truth {m}": baseline.value(clip_id, f"truth_{m}") for m in ON_TRUTH})
        for r in refs:
            row.update({f"{r.column} {m}": baseline.value(clip_id, f"{r.prefix}_{m}") for m in COMPARED})
        # does the prefix condition the model: its first generated frame against the last context frame
        row["baseline continuity psnr"] = baseline.value(clip_id, "continuity_psnr")
        row["truth continuity psnr"] = baseline.value(clip_id, "truth_continuity_psnr")
        row["baseline sample s"] = baseline.value(clip_id, "sample_seconds")
        for i, arm in enumerate(adapted, start=1):
            own = finished_run(baseline, arm, clip_id)
            metrics = own.data.metrics if own else {}
            row[f"A{i} result"] = clip_result(baseline, arm, clip_id)
            for m in COMPARED:
                row[f"A{i} {m}"] = metrics.get(m, math.nan)
                row[f"A{i} Δ{m}"] = row[f"A{i} {m}"] - row[f"baseline {m}"]
            row.update({f"A{i} {m}": metrics.get(m, math.nan) for m in FRAME_METRICS if m not in COMPARED})
            row[f"A{i} continuity psnr"] = metrics.get("continuity_psnr", math.nan)
            row[f"A{i} adapt s"] = metrics.get("adapt_seconds", math.nan)
            row[f"A{i} sample s"] = metrics.get("sample_seconds", math.nan)
        rows.append(row)
    return rows


def outcome(row: dict, arm_index: int, metric: str) -> str:
    """'helped', 'hurt', 'no change', or 'no result' where the arm has no paired value on the clip."""
    delta = row[f"A{arm_index} Δ{metric}"]
    if math.isnan(delta):
        return "no result"
    if delta == 0:
        return "no change"
    return "helped" if improved(metric, delta) else "hurt"


def set_metric_rows(evaluation: Run | None) -> list[dict[str, str]]:
    """Each arm's set metrics (FVD) as the evaluate run logged them (`<arm>.<metric>`), one row per arm."""
    if evaluation is None:
        return []
    logged = evaluation.data.metrics
    arms = sorted({k.split(".")[0] for k in logged if k.count(".") == 1 and k.split(".")[1] in SET_METRICS})
    return [{"arm": arm, **{m: f"{logged[f'{arm}.{m}']:.2f} over {logged[f'{m}.clips']:.0f} clips"
                            for m in SET_METRICS if f"{arm}.{m}" in logged}} for arm in arms]


def compare(baseline: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """Paired statistics of other - baseline over the clips both have a value for."""
    clips = [c for c in other if c in baseline]
    return paired_comparison([baseline[c] for c in clips], [other[c] for c in clips])


def baseline_values(baseline: Arm, clip_ids: list[str], metric: str) -> dict[str, float]:
    return _finite({c: baseline.value(c, metric) for c in clip_ids})


def reference_values(baseline: Arm, reference: Reference, clip_ids: list[str], metric: str) -> dict[str, float]:
    return _finite({c: baseline.value(c, f"{reference.prefix}_{metric}") for c in clip_ids})


def arm_values(baseline: Arm, arm: Arm, clip_ids: list[str], metric: str, itt: bool = True) -> dict[str, float]:
    """clip -> the arm's value: under intention to treat (itt) a failed clip counts as the baseline's
    value; in the complete case only clips the arm finished count."""
    if itt:
        chosen = itt_runs(baseline, arm, clip_ids)
    else:
        chosen = {c: r for c in clip_ids if (r := finished_run(baseline, arm, c))}
    return _finite({c: r.data.metrics.get(metric, math.nan) for c, r in chosen.items()})


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {c: v for c, v in values.items() if not math.isnan(v)}


def failures(baseline: Arm, arm: Arm, clip_ids: list[str]) -> int:
    return sum(failed_run(baseline, arm, c) is not None for c in clip_ids)


ITT_COLUMN = "Δ ITT: a failed clip counts as no change [95% CI]"
COMPLETE_COLUMN = "Δ complete case: clips the arm finished [95% CI]"
SUMMARY_COLUMNS = ("arm", "clips", "failed", "mean ± SE", ITT_COLUMN, "t-test p", "Holm p", "Wilcoxon p",
                   COMPLETE_COLUMN)


def summary_rows(baseline: Arm, adapted: dict[str, Arm], clip_ids: list[str], metric: str) -> list[dict[str, str]]:
    """The summary table over the given clips the baseline scored, as text: the baseline, the reference
    predictors and each adapted arm (by its short name). Δ is the arm minus the baseline; the Holm
    adjustment runs over the adapted arms' ITT t-tests."""
    base = baseline_values(baseline, clip_ids, metric)
    rows = [{"arm": "baseline", "clips": str(len(base)), "failed": f"{len(baseline.failed)} "
             f"({baseline.failure_rate:.0%})", "mean ± SE": _mean_se(base)}]
    for ref in references(baseline):
        values = reference_values(baseline, ref, clip_ids, metric)
        rows.append({"arm": ref.label, "clips": str(len(values)), "mean ± SE": _mean_se(values),
                     **_differences(compare(base, values))})
    itt = {short: arm_values(baseline, arm, clip_ids, metric) for short, arm in adapted.items()}
    stats = {short: compare(base, values) for short, values in itt.items()}
    adjusted = holm([s["t_p_value"] for s in stats.values()])
    for (short, arm), holm_p in zip(adapted.items(), adjusted):
        failed = failures(baseline, arm, clip_ids)
        complete = compare(base, arm_values(baseline, arm, clip_ids, metric, itt=False))
        rows.append({"arm": f"{short}: {arm.label}", "clips": str(len(itt[short])),
                     "failed": f"{failed} ({failed / max(1, len(clip_ids)):.0%})", "mean ± SE": _mean_se(itt[short]),
                     **_differences(stats[short]), "Holm p": _p(holm_p),
                     COMPLETE_COLUMN: _difference(complete) + (f" (n={complete['n']})" if complete["n"] >= 2 else "")})
    return [{column: row.get(column, "—") for column in SUMMARY_COLUMNS} for row in rows]


def _mean_se(values: dict[str, float]) -> str:
    if not values:
        return "no clip"
    mean, se = mean_se(list(values.values()))
    return f"{mean:.4f} ± {se:.4f}" if len(values) > 1 else f"{mean:.4f} (1 clip: no SE)"


def _difference(stats: dict[str, float]) -> str:
    if stats["n"] < 2:
        return f"fewer than 2 paired clips ({stats['n']}): no statistics"
    return f"{stats['diff_mean']:+.4f} [{stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]"


def _differences(stats: dict[str, float]) -> dict[str, str]:
    return {ITT_COLUMN: _difference(stats), "t-test p": _p(stats["t_p_value"]),
            "Wilcoxon p": _p(stats["wilcoxon_p_value"])}


def _p(p: float) -> str:
    return "—" if math.isnan(p) else f"{p:.3g}"


def download_clip(client: MlflowClient, run: Run, cache: Path) -> dict[str, Path] | None:
    """The clip's videos from the run's own artifacts (None when the run has none)."""
    names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "clip")}
    if not set(CLIP_ARTIFACTS) <= names:
        return None
    target = cache / run.info.run_id
    if not all((target / "clip" / n).exists() for n in CLIP_ARTIFACTS):
        target.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(run.info.run_id, "clip", str(target))
    return {n: target / "clip" / n for n in CLIP_ARTIFACTS}
