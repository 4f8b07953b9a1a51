"""Every stage stopped half-way, by kill -9 and by an error, against a real SQLite store: no run is left
RUNNING once the stage runs again, the stopped run says why, and the rerun neither loses nor repeats a
finished result."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, write_config
from pipeline.config import load_config
from pipeline.stages import evaluate as evaluate_module
from pipeline.stages import sweep as sweep_module
from pipeline.stages.continuation import run_stage
from pipeline.stages.evaluate import evaluate
from pipeline.stages.preprocess import run_preprocess
from pipeline.stages.pretrain import pretrain
from pipeline.stages.sweep import run_sweep

# `python -c KILLED TARGET N ARGS...`: the CLI with ARGS, its process SIGKILLed by itself at the N-th call
# of TARGET (module:attribute path), i.e. at a known point inside the stage
KILLED = """
import importlib, os, signal, sys
target, n = sys.argv[1], int(sys.argv[2])
module, _, path = target.partition(":")
owner = importlib.import_module(module)
*parents, name = path.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original, calls = getattr(owner, name), []
def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, killing)
sys.argv = ["pipeline", *sys.argv[3:]]
from pipeline.cli import run
run()
"""
ADAPT = "pipeline.stages.continuation:Continuer.adapt"  # called once per clip by baseline and adapt alike


@pytest.fixture
def own_data(prepared, store, tmp_path):
    """The tiny setup writing its clips to a folder of its own."""
    settings = yaml.safe_load(Path(prepared).read_text())
    settings["data"]["output_dir"] = str(tmp_path / "data")
    return write_config(tmp_path / "own.yaml", settings)


def runs(experiment: str, kind: str, stage: str) -> list:
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], f"tags.`tta.kind` = '{kind}' and "
                                                           f"tags.`tta.stage` = '{stage}'")


def statuses(experiment: str) -> list[str]:
    return [r.info.status for r in MlflowClient().search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])]


def kill_inside(experiment: str, target: str, n: int, stage: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED, target, str(n), stage, *args], cwd=ROOT,
                          env=os.environ.copy(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "RUNNING" in [r.info.status for r in runs(experiment, "stage", stage)]  # what kill -9 leaves


def finished_once(experiment: str, stage: str) -> dict[tuple[str, str], str]:
    """(digest, clip) -> the id of its one finished clip run."""
    done = [r for r in runs(experiment, "clip", stage) if r.info.status == "FINISHED"]
    keys = [(r.data.tags["tta.digest"], r.data.tags["tta.clip_id"]) for r in done]
    assert len(keys) == len(set(keys)), "a clip has two finished results"
    return {k: r.info.run_id for k, r in zip(keys, done)}


def test_kill_9_in_every_stage_is_marked_and_resumed(own_data):
    config = load_config(own_data)
    exp = config.experiment
    cli_args = ("--config", str(own_data))

    def check(stage: str, kind: str = "stage") -> None:
        stopped = [r for r in runs(exp, kind, stage) if r.info.status != "FINISHED"]
        assert [r.info.status for r in stopped] == ["KILLED"], stage
        assert "its process stopped without ending the run" in stopped[0].data.tags["tta.error"]
        assert "RUNNING" not in statuses(exp), stage

    kill_inside(exp, "pipeline.data.preprocess:write_clip", 2, "preprocess", *cli_args)
    run_preprocess(config)
    check("preprocess")

    kill_inside(exp, "pipeline.stages.pretrain:train_weights", 1, "pretrain", *cli_args, "--set", "pretrain.steps=5")
    pretrain(load_config(own_data, {"pretrain.steps": "5"}))
    check("pretrain")

    for stage in ("baseline", "adapt"):
        kill_inside(exp, ADAPT, 2, stage, *cli_args)
        before = finished_once(exp, stage)
        run_stage(config, stage)
        after = finished_once(exp, stage)
        assert len(after) == 3 and set(before.items()) <= set(after.items())  # kept, not redone
        check(stage)

    kill_inside(exp, "pipeline.stages.evaluate:summary_on_stage_runs", 1, "evaluate", *cli_args)
    evaluate(config)
    check("evaluate")

    # the sweep's second arm, inside its first clip: the first arm is evaluated, the second half-done
    grid = ("--grid", "adaptation.rank=2,3")
    kill_inside(exp, ADAPT, 4, "sweep", *cli_args, *grid)
    first_arm = finished_once(exp, "adapt")
    points = [{"adaptation.rank": "2"}, {"adaptation.rank": "3"}]
    run_sweep(points, [load_config(own_data, p) for p in points], config)
    check("sweep")
    assert sorted(r.info.status for r in runs(exp, "stage", "adapt") if r.data.params["adaptation.rank"] == "3") == [
        "FINISHED", "KILLED"]
    assert set(first_arm.items()) <= set(finished_once(exp, "adapt").items())
    assert len(finished_once(exp, "adapt")) == 9  # rank 4 (the adapt stage's), 2 and 3: 3 clips each


def test_an_error_in_every_stage_fails_its_run_with_the_reason(own_data, monkeypatch):
    config = load_config(own_data)
    exp = config.experiment

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (injected)")

    def fails(stage: str, call, module, name: str) -> None:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, broken)
            with pytest.raises(RuntimeError, match="disk full"):
                call()
        failed = [r for r in runs(exp, "stage", stage) if r.info.status == "FAILED"]
        assert len(failed) == 1 and failed[0].data.tags["tta.error"] == "RuntimeError: disk full (injected)", stage
        assert "RUNNING" not in statuses(exp), stage

    from pipeline.stages import continuation, preprocess
    from pipeline.stages import pretrain as pretrain_module

    fails("preprocess", lambda: run_preprocess(config), preprocess, "preprocess")
    run_preprocess(config)
    fails("pretrain", lambda: pretrain(load_config(own_data, {"pretrain.steps": "6"})), pretrain_module,
          "train_weights")
    for stage in ("baseline", "adapt"):
        fails(stage, lambda: run_stage(config, stage), continuation, "log_clips_as_dataset")
        run_stage(config, stage)
        assert len(finished_once(exp, stage)) == 3
    fails("evaluate", lambda: evaluate(config), evaluate_module, "summary_on_stage_runs")
    points = [{"adaptation.rank": "2"}]
    fails("sweep", lambda: run_sweep(points, [load_config(own_data, points[0])], config), sweep_module, "evaluate")
    run_sweep(points, [load_config(own_data, points[0])], config)
    assert len(finished_once(exp, "adapt")) == 6 and "RUNNING" not in statuses(exp)
