"""Stages end to end against a real SQLite MLflow store: runs, resume after kill -9, bad input."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, cli, write_config
from pipeline.config import load_config
from pipeline.data.manifest import ClipRecord, read_manifest, write_manifest
from pipeline.data.video_io import write_video
from pipeline.stages.continuation import run_stage, stage_digest
from pipeline.stages.evaluate import evaluate


def clip_runs(experiment: str, stage: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], f"tags.`tta.stage` = '{stage}' and tags.`tta.kind` = 'clip'")


def test_stages_log_parent_children_and_evaluate(prepared, store):
    config = load_config(prepared)
    baseline_id = run_stage(config, "baseline")
    run_stage(config, "adapt")
    summary = evaluate(config)
    parent = mlflow.get_run(baseline_id)
    assert parent.data.params["adaptation.rank"] == "4" and parent.data.tags["git_commit"]
    children = clip_runs("tiny", "baseline")
    assert len(children) == 3 and all(r.data.tags["mlflow.parentRunId"] == baseline_id for r in children)
    child = children[0]
    assert {"psnr", "ssim", "sample_seconds"} <= set(child.data.metrics)
    m = child.data.metrics
    parts = m["load_seconds"] + m["encode_seconds"] + m["sample_seconds"] + m["decode_seconds"] + \
        m["metrics_seconds"] + m["record_seconds"] + m.get("adapt_seconds", 0)
    assert 0 < m["non_model_share"] < 1 and parts <= m["clip_seconds"] * 1.001
    assert all(r.data.metrics["video_write_seconds"] > 0 for r in children)  # encoded on a worker thread
    assert child.data.tags["tta.class"] and child.data.tags["tta.source"] == "synthetic"
    artifacts = {a.path for a in MlflowClient().list_artifacts(child.info.run_id, "clip")}
    assert artifacts == {"clip/context.mp4", "clip/target.mp4", "clip/output.mp4", "clip/frame_metrics.json"}
    adapted = clip_runs("tiny", "adapt")
    assert set(adapted[0].data.metrics) >= set(child.data.metrics) | {"adapt_seconds", "adapt_steps_per_second"}
    assert {a.path for a in MlflowClient().list_artifacts(adapted[0].info.run_id, "clip")} == artifacts  # no weights
    # evaluation: paired stats, per-frame curves over [K, T), artifacts
    psnr = summary["metrics"]["psnr"]
    assert psnr["n"] == 3 and psnr["ci_low"] <= psnr["diff_mean"] <= psnr["ci_high"]
    assert psnr["per_frame"]["baseline"]["frame"] == [3, 4, 5]
    eval_artifacts = {a.path for a in MlflowClient().list_artifacts(summary["run_id"])}
    assert {"metrics.json", "plots.html"} <= eval_artifacts
    path = MlflowClient().download_artifacts(summary["run_id"], "metrics.json")
    assert json.loads(Path(path).read_text())["metrics"]["ssim"]["n"] == 3


def test_rerun_skips_finished_clips(prepared, store):
    config = load_config(prepared)
    run_stage(config, "baseline")
    first = {r.data.tags["tta.clip_id"]: r.info.run_id for r in clip_runs("tiny", "baseline")}
    run_stage(config, "baseline")
    assert {r.data.tags["tta.clip_id"]: r.info.run_id for r in clip_runs("tiny", "baseline")} == first


def test_adapted_lora_weights_are_kept_when_asked(prepared, store):
    from safetensors.torch import load_file

    config = load_config(prepared, {"adaptation.save_weights": "true"})
    run_stage(config, "adapt")
    client = MlflowClient()
    weights = [load_file(client.download_artifacts(r.info.run_id, "clip/lora.safetensors"))
               for r in clip_runs("tiny", "adapt")]
    assert len(weights) == 3 and all(w.keys() == weights[0].keys() for w in weights)
    lora_b = [name for name in weights[0] if "lora_B" in name]
    assert lora_b and all(weights[0][name].abs().sum() > 0 for name in lora_b)  # trained: lora_B starts at 0
    assert any(not torch.equal(weights[0][name], weights[1][name]) for name in lora_b)  # each clip its own


def test_kill_9_mid_clip_resumes_with_one_result_per_clip(prepared, store, tmp_path):
    settings = yaml.safe_load(Path(prepared).read_text())
    settings["adaptation"]["steps"] = 150  # slow enough to be killed inside a clip
    config_path = write_config(tmp_path / "slow.yaml", settings)
    command = cli("adapt", "--config", str(config_path))
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    deadline = time.time() + 240
    while time.time() < deadline:
        if mlflow.get_experiment_by_name("tiny"):
            statuses = [r.info.status for r in clip_runs("tiny", "adapt")]
            if "FINISHED" in statuses and "RUNNING" in statuses:
                break
        time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError("the stage never had a finished and a running clip")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r.data.tags["tta.clip_id"]: r.info.run_id for r in clip_runs("tiny", "adapt")
              if r.info.status == "FINISHED"}
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=os.environ.copy())
    runs = clip_runs("tiny", "adapt")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["tta.clip_id"] for r in finished) == sorted(c.clip_id for c in read_manifest(
        load_config(config_path).data.manifest) if c.split == "test")
    assert all(any(r.info.run_id == run_id for r in finished) for run_id in before.values())  # not redone
    # redone: the clip on the GPU and, if its videos were still being written, the one before it
    assert 1 <= [r.info.status for r in runs].count("KILLED") <= 2 and "RUNNING" not in [r.info.status for r in runs]


def test_bad_clips_are_recorded_and_the_rest_goes_on(prepared, store, tmp_path):
    config = load_config(prepared)
    good = [r for r in read_manifest(config.data.manifest) if r.split == "test"]
    source = Path(config.data.manifest).parent
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    (tmp_path / "notes.txt").write_text("not a video")
    write_video(tmp_path / "short.mp4", np.zeros((2, 16, 16, 3), np.uint8), 8)
    write_video(tmp_path / "wide.mp4", np.zeros((6, 16, 24, 3), np.uint8), 8)

    def bad(clip_id, name):
        return ClipRecord(clip_id, "bad", str(tmp_path / name), 6, 8.0, 16, 16, "test", name)

    records = [ClipRecord(**{**r.__dict__, "path": str(source / r.path)}) for r in good] + [
        bad("corrupt", "garbage.mp4"), bad("short", "short.mp4"), bad("text", "notes.txt"),
        bad("missing", "nowhere.mp4"), bad("size", "wide.mp4")]
    out = tmp_path / "data"
    write_manifest(out / "manifest.csv", records)
    config = load_config(prepared, {"data.output_dir": str(out), "data.num_clips": "0"})
    run_stage(config, "baseline")
    run_stage(config, "adapt")
    runs = {r.data.tags["tta.clip_id"]: r for r in clip_runs("tiny", "adapt")}
    assert all(runs[r.clip_id].info.status == "FINISHED" for r in good)
    expected = {"corrupt": "not a readable video", "short": "too short: 2 frames", "text": "not a readable video",
                "missing": "file does not exist", "size": "frame size 24x16 differs"}
    for clip_id, reason in expected.items():
        run = runs[clip_id]
        assert run.info.status == "FAILED"
        assert reason in run.data.tags["tta.error"] and str(tmp_path) in run.data.tags["tta.error"]
    summary = evaluate(config)
    assert summary["metrics"]["psnr"]["n"] == len(good)
    assert set(summary["excluded"]) == set(expected) and "too short" in summary["excluded"]["short"]


def test_mlflow_run_entry_point(prepared, store):
    """`mlflow run . -e adapt -P rank=16` in the installed environment: a parent run with clip children."""
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["mlflow", "run", ".", "-e", "adapt", "-P", "rank=16", "-P", f"config={prepared}",
                             "--env-manager", "local", "--experiment-name", "mlproject"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = mlflow.get_experiment_by_name("mlproject")
    parents = MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'stage'")
    assert len(parents) == 1 and parents[0].data.params["adaptation.rank"] == "16"
    assert parents[0].data.params["rank"] == "16"  # MLflow's own record of -P
    children = MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'clip'")
    assert len(children) == 3 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert stage_digest(load_config(prepared, {"adaptation.rank": "16"}), "adapt") == children[0].data.tags["tta.digest"]
