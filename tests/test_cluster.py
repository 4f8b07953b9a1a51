"""Job-array tasks against a real `mlflow server` on loopback: sbatch scripts, 4 concurrent writers
with one killed by kill -9, preemption signals."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, cli, mlflow_server, write_config
from pipeline.config import load_config
from pipeline.data.manifest import read_manifest, select_clips
from pipeline.stages.preprocess import run_preprocess
from pipeline.tracking.runs import get_or_create_experiment

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    with mlflow_server(f"sqlite:///{base / 'db.sqlite'}", base / "artifacts") as uri:
        yield uri


@pytest.fixture
def eight_clips(prepared, store, tmp_path):
    """8 test clips for the tiny model of `prepared` (its weights are reused)."""
    settings = yaml.safe_load(Path(prepared).read_text())
    settings["experiment"] = f"cluster-{tmp_path.name}"
    settings["data"].update(output_dir=str(tmp_path / "data"), train_clips=0, test_clips=8, num_clips=0)
    settings["adaptation"]["steps"] = 120  # slow enough to be stopped inside a clip
    path = write_config(tmp_path / "eight.yaml", settings)
    run_preprocess(load_config(path))
    return path


def clip_runs(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'clip'") if exp else []


def wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_four_workers_one_killed_nothing_lost(server, eight_clips):
    mlflow.set_tracking_uri(server)
    env = {**ENV, "MLFLOW_TRACKING_URI": server}
    config = load_config(eight_clips)
    workers = [subprocess.Popen(cli("adapt", "--config", str(eight_clips), "--shard", f"{i}/4"), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(4)]
    shard0 = [c.clip_id for c in select_clips(read_manifest(config.data.manifest), "test", 0)][0::4]

    def shard0_running():
        return any(r.info.status == "RUNNING" and r.data.tags["tta.clip_id"] in shard0
                   for r in clip_runs(config.experiment))
    wait_for(shard0_running, 300, "worker 0 to be inside a clip")
    workers[0].send_signal(signal.SIGKILL)
    for w in workers[1:]:
        assert w.wait(timeout=600) == 0, w.stderr.read().decode()[-2000:]
    subprocess.run(cli("adapt", "--config", str(eight_clips), "--shard", "0/4"), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    runs = clip_runs(config.experiment)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    ids = [r.data.tags["tta.clip_id"] for r in finished]
    assert sorted(ids) == sorted(c.clip_id for c in read_manifest(config.data.manifest)) and len(set(ids)) == 8
    assert "RUNNING" not in {r.info.status for r in runs}
    for run in finished:  # every artifact made it through the server
        names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "clip")}
        assert names == {"clip/context.mp4", "clip/target.mp4", "clip/output.mp4", "clip/frame_metrics.json"}


def test_rendered_sbatch_runs_one_task_locally(server, eight_clips):
    mlflow.set_tracking_uri(server)
    rendered = subprocess.run(cli("submit", "--stage", "baseline", "--config", str(eight_clips), "--tasks", "2",
                                  "--tracking-uri", server, "--scratch", str(Path(eight_clips).parent / "scratch"),
                                  "--dry-run"), cwd=ROOT, env=ENV, check=True, capture_output=True, text=True)
    assert "#SBATCH --array=0-1" in rendered.stdout and "#SBATCH --requeue" in rendered.stdout
    script = ROOT / "slurm" / "rendered" / "tta-baseline.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**ENV, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    env.pop("SLURM_JOB_ID", None)
    subprocess.run(["bash", str(script)], cwd=ROOT, env=env, check=True, capture_output=True)
    config = load_config(eight_clips)
    shard1 = [c.clip_id for c in select_clips(read_manifest(config.data.manifest), "test", 0)][1::2]
    assert sorted(r.data.tags["tta.clip_id"] for r in clip_runs(config.experiment)
                  if r.data.tags["tta.stage"] == "baseline" and r.info.status == "FINISHED") == sorted(shard1)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_abandons_the_clip_and_resumes(eight_clips, sig):
    config = load_config(eight_clips)
    command = cli("adapt", "--config", str(eight_clips), "--num-clips", "2")
    proc = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_for(lambda: any(r.info.status == "RUNNING" for r in clip_runs(config.experiment)), 120, "a running clip")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 75
    assert f"preempted by {sig.name}" in proc.stderr.read().decode()
    killed = [r for r in clip_runs(config.experiment) if r.info.status == "KILLED"]
    assert len(killed) == 1 and killed[0].data.tags["tta.error"] == f"preempted by {sig.name}"
    parent = mlflow.get_run(killed[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=os.environ.copy())
    finished = [r.data.tags["tta.clip_id"] for r in clip_runs(config.experiment) if r.info.status == "FINISHED"]
    assert len(finished) == 2 == len(set(finished))


def test_sqlite_store_is_refused_for_a_job_array(eight_clips):
    result = subprocess.run(cli("adapt", "--config", str(eight_clips), "--shard", "0/2"), cwd=ROOT,
                            env=os.environ.copy(), capture_output=True, text=True)
    assert result.returncode != 0 and "SQLite file, which is not safe for many concurrent writers" in result.stderr


def test_experiment_created_by_another_worker_meanwhile_is_used(server, monkeypatch):
    """Array tasks start together: one may create the experiment between another's lookup and create."""
    mlflow.set_tracking_uri(server)
    lookup = mlflow.get_experiment_by_name
    calls = []

    def created_meanwhile(name):
        calls.append(name)
        if len(calls) == 1:
            MlflowClient().create_experiment(name)
            return None
        return lookup(name)
    monkeypatch.setattr(mlflow, "get_experiment_by_name", created_meanwhile)
    assert get_or_create_experiment("raced") == lookup("raced").experiment_id
