"""A sweep: every arm of a grid of adaptation settings over the same clips, against one baseline.

`python -m pipeline sweep --grid adaptation.rank=4,16,64 --grid adaptation.lr=1e-4,2e-4` checks every
point's config before anything runs (`config.grid_points`), runs the baseline once (its key leaves
the adaptation settings out, so every arm pairs with it), then adapts and evaluates each arm in
turn. Finished clips are reused as in every stage, so a rerun or a grown grid only computes what is
new. The last table ranks the arms by their paired gain.

The sweep is a stage run of its own (`tta.stage` = sweep) with the other stage runs nested under it;
its artifact `sweep.json` (`log_arms_record`) names the grid, the baseline and each arm's digest and ranked result, which
is how the viewer gathers the arms of a sweep.

Under SLURM (`sweep --slurm`) each task of one job array runs a shard of the baseline or of one arm
(`run_sweep_task`); a last job runs the sweep itself, which then finds every clip finished.
"""
from __future__ import annotations

import hashlib
import json

from ..runtime.cluster import Shard
from ..config import Config
from ..evaluation.registry import LOWER_IS_BETTER
from ..tracking.runs import log_arms_record, stage_run
from .continuation import arm_run_name, run_stage, stage_digest
from .evaluate import evaluate


def run_sweep(points: list[dict[str, str]], configs: list[Config], base: Config, metric: str = "psnr") -> list[dict]:
    """Each arm (a grid point and its checked config) adapted and evaluated against one baseline; their
    paired gains on `metric` (ITT), ranked best first. `base` is the config without the grid."""
    digests = [stage_digest(c, "adapt") for c in configs]
    digest = hashlib.sha256(json.dumps([stage_digest(base, "baseline"), *digests]).encode()).hexdigest()[:16]
    grid = {key: list(dict.fromkeys(p[key] for p in points)) for key in points[0]}
    name = "sweep " + " ".join(f"{key}={','.join(values)}" for key, values in grid.items())
    with stage_run(base, "sweep", digest, name):
        run_stage(configs[0], "baseline")
        results = []
        for point, config, arm_digest in zip(points, configs, digests):
            run_stage(config, "adapt")
            summary = evaluate(config)
            row = next(c for c in summary["comparisons"] if (c["a"], c["b"], c["metric"]) == ("adapted", "baseline",
                                                                                             metric)
                       and c["analysis"].startswith("ITT"))
            results.append({"arm": arm_run_name(config, "adapt"), "digest": arm_digest, "point": point,
                            "n": row["n"], "gain": row["diff_mean"], "ci_low": row["ci_low"],
                            "ci_high": row["ci_high"], "p": row["t_p_value"],
                            "failed": summary["arms"]["adapted"]["failed"]})
        results.sort(key=lambda r: r["gain"], reverse=metric not in LOWER_IS_BETTER)
        log_arms_record(grid, metric, stage_digest(base, "baseline"), results)
    print(format_sweep(results, metric), flush=True)
    return results


def run_sweep_task(configs: list[Config], task: int, shards: int) -> tuple[str, str]:
    """Task `task` of the sweep's job array: shard task % shards of the baseline (the first `shards`
    tasks) or of arm task // shards - 1. Returns the stage and its run id (as run_stage)."""
    arm, shard = divmod(task, shards)
    stage, config = ("baseline", configs[0]) if arm == 0 else ("adapt", configs[arm - 1])
    return stage, run_stage(config, stage, shard=Shard(shard, shards))


def format_sweep(results: list[dict], metric: str) -> str:
    lines = [f"sweep: {len(results)} arms against one baseline, ranked by the paired {metric} gain (ITT)",
             f"{'arm':<34}{'n':>4}{'gain [95% CI]':>32}{'t p':>9}{'failed':>8}  settings"]
    for r in results:
        settings = " ".join(f"{k}={v}" for k, v in r["point"].items())
        lines.append(f"{r['arm']:<34}{r['n']:>4}{r['gain']:>+12.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
                     f"{r['p']:>9.3g}{r['failed']:>8}  {settings}")
    return "\n".join(lines)
