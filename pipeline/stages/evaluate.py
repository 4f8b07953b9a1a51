"""The evaluate stage: pair the baseline and adapted arms of one config by clip and compare them."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ..config import Config
from ..data.manifest import read_manifest, select_clips
from ..evaluation.plots import summary_figure, write_html
from ..evaluation.stats import mean_se, paired_comparison
from ..tracking.runs import TAG_CLIP, TAG_DIGEST, TAG_ERROR, finished_clips, frame_curve, stage_run
from .continuation import arm_label, stage_digest

METRICS = ("psnr", "ssim", "lpips")  # higher is better for PSNR and SSIM, lower for LPIPS
COSTS = ("adapt_seconds", "sample_seconds", "adapt_steps_per_second", "non_model_share", "peak_gpu_memory_mb",
         "peak_rss_mb")


def evaluate(config: Config) -> dict:
    digests = {"baseline": stage_digest(config, "baseline"), "adapt": stage_digest(config, "adapt")}
    with stage_run(config, "evaluate", digests["adapt"]) as parent:
        experiment_id = parent.info.experiment_id
        arms = {stage: finished_clips(experiment_id, stage, digest) for stage, digest in digests.items()}
        d = config.data
        clip_ids = [c.clip_id for c in select_clips(read_manifest(d.manifest), d.split, d.num_clips)]
        paired = [c for c in clip_ids if c in arms["baseline"] and c in arms["adapt"]]
        if not paired:
            raise ValueError(f"no clip has finished results in both arms (baseline digest {digests['baseline']}, "
                             f"adapt digest {digests['adapt']}): run the baseline and adapt stages with this config")
        summary = _summarise(config, arms, paired, clip_ids, experiment_id, digests)
        mlflow.set_tags({"tta.baseline_digest": digests["baseline"], "tta.adapt_digest": digests["adapt"]})
        mlflow.log_metrics(_flat_metrics(summary))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "metrics.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
            write_html(summary_figure(summary), Path(tmp) / "plots.html")
            mlflow.log_artifacts(tmp)
        summary["run_id"] = parent.info.run_id
    print(format_table(summary), flush=True)
    return summary


def _summarise(config: Config, arms: dict, paired: list[str], clip_ids: list[str], experiment_id: str,
               digests: dict[str, str]) -> dict:
    base, adapted = arms["baseline"], arms["adapt"]
    names = [m for m in METRICS if all(m in base[c].data.metrics and m in adapted[c].data.metrics for c in paired)]
    summary = {
        "title": f"{config.experiment}: {arm_label(config, 'adapt')} vs baseline, {len(paired)} clips",
        "arms": {"baseline": "baseline", "adapted": arm_label(config, "adapt")},
        "oracle": config.adaptation.data == "oracle",
        "clips": paired,
        "excluded": _excluded(clip_ids, paired, arms, experiment_id, digests),
        "metrics": {},
        "cost": {},
    }
    for name in names:
        values = {arm: [runs[c].data.metrics[name] for c in paired] for arm, runs in (("baseline", base),
                                                                                     ("adapted", adapted))}
        stats = paired_comparison(values["baseline"], values["adapted"])
        stats["differences"] = [a - b for a, b in zip(values["adapted"], values["baseline"])]
        stats["per_frame"] = {arm: frame_curve([runs[c] for c in paired], name)
                              for arm, runs in (("baseline", base), ("adapted", adapted))}
        summary["metrics"][name] = stats
    for arm, runs in (("baseline", base), ("adapted", adapted)):
        for cost in COSTS:
            values = [runs[c].data.metrics[cost] for c in paired if cost in runs[c].data.metrics]
            if values:
                summary["cost"][f"{arm}.{cost}"] = mean_se(values)[0]
    return summary


def _excluded(clip_ids: list[str], paired: list[str], arms: dict, experiment_id: str,
              digests: dict[str, str]) -> dict[str, str]:
    """Why each selected clip is missing from the comparison (the error recorded on its run, if any)."""
    reasons = {}
    for clip in set(clip_ids) - set(paired):
        missing = [stage for stage in arms if clip not in arms[stage]]
        errors = []
        for stage in missing:
            failed = MlflowClient().search_runs(
                [experiment_id], f"tags.`{TAG_CLIP}` = '{clip}' and tags.`{TAG_DIGEST}` = '{digests[stage]}' and "
                                 f"attributes.status = 'FAILED'", max_results=1)
            errors += [failed[0].data.tags.get(TAG_ERROR, "")] if failed else []
        reasons[clip] = f"no finished {' and '.join(missing)} result" + (f": {errors[0]}" if errors else "")
    return reasons


def _flat_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for name, s in summary["metrics"].items():
        for key in ("baseline_mean", "baseline_se", "adapted_mean", "adapted_se", "diff_mean", "ci_low", "ci_high",
                    "t_p_value", "wilcoxon_p_value"):
            if not math.isnan(s[key]):
                out[f"{name}_{key}"] = s[key]
    out.update({k.replace(".", "_"): v for k, v in summary["cost"].items()})
    out["clips_paired"] = len(summary["clips"])
    return out


def format_table(summary: dict) -> str:
    lines = [summary["title"] + (" [ORACLE upper bound]" if summary["oracle"] else ""), ""]
    header = f"{'metric':<7}{'baseline':>20}{'adapted':>20}{'adapted - baseline [95% CI]':>38}{'t-test p':>10}{'Wilcoxon p':>12}"
    lines.append(header)
    for name, s in summary["metrics"].items():
        lines.append(f"{name:<7}{_pm(s['baseline_mean'], s['baseline_se']):>20}{_pm(s['adapted_mean'], s['adapted_se']):>20}"
                     f"{s['diff_mean']:>+14.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]"
                     f"{s['t_p_value']:>10.3g}{s['wilcoxon_p_value']:>12.3g}")
    if "lpips" not in summary["metrics"]:
        lines.append("lpips  unavailable (see the stage runs' tta.lpips tag; `python -m pipeline fetch-weights`)")
    lines.append("")
    cost = summary["cost"]
    lines.append(f"seconds per clip: adaptation {cost.get('adapted.adapt_seconds', 0):.2f}, sampling baseline "
                 f"{cost.get('baseline.sample_seconds', math.nan):.2f} / adapted {cost.get('adapted.sample_seconds', math.nan):.2f}")
    lines.append(f"share of a clip's wall time outside the model (loading, scoring, recording): baseline "
                 f"{cost.get('baseline.non_model_share', math.nan):.1%} / adapted "
                 f"{cost.get('adapted.non_model_share', math.nan):.1%}")
    for clip, reason in sorted(summary["excluded"].items()):
        lines.append(f"excluded {clip}: {reason}")
    return "\n".join(lines)


def _pm(mean: float, se: float) -> str:
    return f"{mean:.4f} ± {se:.4f}"
