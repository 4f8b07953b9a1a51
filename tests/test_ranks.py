"""Two processes adapting to each clip (torchrun, gloo on the CPU): gradients averaged over ranks."""
import subprocess
import sys

import mlflow
from mlflow.tracking import MlflowClient

from conftest import ROOT, cli


def _adapted_psnr(experiment: str) -> dict[str, float]:
    exp = mlflow.get_experiment_by_name(experiment)
    runs = MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'clip' and tags.`tta.stage` = 'adapt'")
    assert all(r.info.status == "FINISHED" for r in runs)
    ids = [r.data.tags["tta.clip_id"] for r in runs]
    assert len(ids) == len(set(ids)), "a clip was recorded twice"
    return {r.data.tags["tta.clip_id"]: r.data.metrics["psnr"] for r in runs}


def test_two_ranks_share_each_clip_and_rank_0_records_it(prepared, store):
    one = subprocess.run(cli("adapt", "--config", str(prepared), "--set", "experiment=one-rank"), cwd=ROOT,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "pipeline", "adapt", "--config", str(prepared), "--set", "experiment=two-ranks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = _adapted_psnr("one-rank"), _adapted_psnr("two-ranks")
    assert set(single) == set(double) and len(double) == 3  # every clip once, written by rank 0 only
    # rank 1's own noise draws enter the averaged gradients, so the adapted model differs
    assert any(abs(single[c] - double[c]) > 1e-6 for c in single)
