"""What the viewer reads from the tracking store, through the MLflow client API only (read-only).

An arm is one stage (baseline or adapt) at one config digest: all its finished clip runs, whichever
invocation (parent run) produced them. Arms are paired by clip id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.evaluation.stats import paired_comparison
from pipeline.tracking import runs
from pipeline.tracking.runs import TAG_CLASS, TAG_DIGEST, TAG_KIND, TAG_STAGE, finished_clips, search_all

METRICS = ("psnr", "ssim", "lpips")
LOWER_IS_BETTER = {"lpips"}
CLIP_ARTIFACTS = ("context.mp4", "target.mp4", "output.mp4")


@dataclass
class Arm:
    stage: str
    digest: str
    label: str
    oracle: bool
    parent_ids: list[str]
    clips: dict[str, Run] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.digest}"

    def value(self, clip_id: str, metric: str) -> float:
        return self.clips[clip_id].data.metrics.get(metric, math.nan)


def list_experiments(client: MlflowClient) -> list:
    """Experiments that hold at least one baseline or adapt stage run."""
    return [e for e in client.search_experiments() if _stage_runs(client, e.experiment_id)]


def _stage_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs = search_all(experiment_id, f"tags.`{TAG_KIND}` = 'stage'", order_by=["attributes.start_time DESC"])
    return [r for r in runs if r.data.tags.get(TAG_STAGE) in ("baseline", "adapt")]


def list_arms(client: MlflowClient, experiment_id: str) -> list[Arm]:
    """One arm per (stage, digest), newest first, with its finished clip runs."""
    arms: dict[str, Arm] = {}
    for run in _stage_runs(client, experiment_id):
        tags = run.data.tags
        key = f"{tags[TAG_STAGE]}:{tags[TAG_DIGEST]}"
        if key in arms:
            arms[key].parent_ids.append(run.info.run_id)
            continue
        label = tags.get("tta.arm", tags[TAG_STAGE])
        arms[key] = Arm(tags[TAG_STAGE], tags[TAG_DIGEST], label, "ORACLE" in label, [run.info.run_id])
    for arm in arms.values():
        arm.clips = finished_clips(experiment_id, arm.stage, arm.digest)
    return list(arms.values())


def clip_rows(baseline: Arm, adapted: list[Arm]) -> list[dict]:
    """One row per clip present in the baseline and every adapted arm."""
    rows = []
    for clip_id in sorted(set(baseline.clips).intersection(*(a.clips for a in adapted))):
        row = {"clip": clip_id, "class": baseline.clips[clip_id].data.tags.get(TAG_CLASS, "")}
        for m in METRICS:
            row[f"baseline {m}"] = baseline.value(clip_id, m)
        row["baseline sample s"] = baseline.value(clip_id, "sample_seconds")
        for i, arm in enumerate(adapted, start=1):
            for m in METRICS:
                row[f"A{i} {m}"] = arm.value(clip_id, m)
                row[f"A{i} Δ{m}"] = row[f"A{i} {m}"] - row[f"baseline {m}"]
            row[f"A{i} adapt s"] = arm.value(clip_id, "adapt_seconds")
            row[f"A{i} sample s"] = arm.value(clip_id, "sample_seconds")
        rows.append(row)
    return rows


def helped(row: dict, arm_index: int = 1, metric: str = "psnr") -> bool:
    delta = row[f"A{arm_index} Δ{metric}"]
    return delta < 0 if metric in LOWER_IS_BETTER else delta > 0


def arm_statistics(rows: list[dict], arm_index: int, metric: str) -> dict[str, float]:
    """Paired statistics of one adapted arm against the baseline over the given clip rows."""
    pairs = [(r[f"baseline {metric}"], r[f"A{arm_index} {metric}"]) for r in rows
             if not math.isnan(r[f"baseline {metric}"]) and not math.isnan(r[f"A{arm_index} {metric}"])]
    return paired_comparison([b for b, _ in pairs], [a for _, a in pairs])


def frame_curve(arm: Arm, clip_ids: list[str], metric: str) -> dict[str, list]:
    return runs.frame_curve([arm.clips[c] for c in clip_ids], metric)


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
