"""A sweep: every arm of a grid of adaptation settings over the same clips, against one baseline.

`python -m pipeline sweep --grid adaptation.rank=4,16,64 --grid adaptation.lr=1e-4,2e-4` checks every
point's config before anything runs (`config.grid_points`), runs the baseline once (its key leaves
the adaptation settings out, so every arm pairs with it), then adapts and evaluates each arm in
turn. Finished clips are reused as in every stage, so a rerun or a grown grid only computes what is
new. The last table ranks the arms by their paired gain.
"""
from __future__ import annotations

from ..config import Config
from ..evaluation.metrics import LOWER_IS_BETTER
from .continuation import arm_run_name, run_stage
from .evaluate import evaluate


def run_sweep(points: list[dict[str, str]], configs: list[Config], metric: str = "psnr") -> list[dict]:
    """Each arm (a grid point and its checked config) adapted and evaluated against one baseline; their
    paired gains on `metric` (ITT), ranked best first."""
    run_stage(configs[0], "baseline")
    results = []
    for point, config in zip(points, configs):
        run_stage(config, "adapt")
        summary = evaluate(config)
        row = next(c for c in summary["comparisons"] if (c["a"], c["b"], c["metric"]) == ("adapted", "baseline", metric)
                   and c["analysis"].startswith("ITT"))
        results.append({"arm": arm_run_name(config, "adapt"), "point": point, "n": row["n"],
                        "gain": row["diff_mean"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
                        "p": row["t_p_value"], "failed": summary["arms"]["adapted"]["failed"]})
    results.sort(key=lambda r: r["gain"], reverse=metric not in LOWER_IS_BETTER)
    print(format_sweep(results, metric), flush=True)
    return results


def format_sweep(results: list[dict], metric: str) -> str:
    lines = [f"sweep: {len(results)} arms against one baseline, ranked by the paired {metric} gain (ITT)",
             f"{'arm':<34}{'n':>4}{'gain [95% CI]':>32}{'t p':>9}{'failed':>8}  settings"]
    for r in results:
        settings = " ".join(f"{k}={v}" for k, v in r["point"].items())
        lines.append(f"{r['arm']:<34}{r['n']:>4}{r['gain']:>+12.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
                     f"{r['p']:>9.3g}{r['failed']:>8}  {settings}")
    return "\n".join(lines)
