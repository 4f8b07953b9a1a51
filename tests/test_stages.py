"""Stages end to end against a real SQLite MLflow store: runs, resume after kill -9, bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, cli, write_config
from pipeline.config import load_config
from pipeline.data.manifest import ClipRecord, read_manifest, write_manifest
from pipeline.data.video_io import frames_hash, read_video, write_clip, write_video
from pipeline.stages.continuation import REFERENCE_LABELS, run_stage, stage_digest
from pipeline.stages.evaluate import evaluate, format_table


def clip_runs(experiment: str, stage: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], f"tags.`tta.stage` = '{stage}' and tags.`tta.kind` = 'clip'")


def test_stages_log_parent_children_and_evaluate(prepared, store, capsys):
    config = load_config(prepared)
    baseline_id = run_stage(config, "baseline")
    run_stage(config, "adapt")
    assert run_stage(config, "adapt") == ""  # nothing left to do: no second, empty stage run
    summary = evaluate(config)
    parent = mlflow.get_run(baseline_id)
    assert parent.data.params["adaptation.rank"] == "4" and parent.data.tags["git_commit"]
    dataset = parent.inputs.dataset_inputs[0].dataset  # the clips, as the UI's Dataset column shows them
    assert dataset.name == "data/test" and json.loads(dataset.profile)["num_rows"] == 3
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
    assert child.data.tags["tta.arm"] == parent.data.tags["tta.arm"] == "baseline"
    artifacts = {a.path for a in MlflowClient().list_artifacts(child.info.run_id, "clip")}
    assert artifacts == {"clip/context.mp4", "clip/target.mp4", "clip/output.mp4", "clip/frame_metrics.json"}
    adapted = clip_runs("tiny", "adapt")
    model_metrics = {k for k in child.data.metrics if not k.startswith((*REFERENCE_LABELS, "reference", "truth"))}
    assert set(adapted[0].data.metrics) >= model_metrics | {"adapt_seconds", "adapt_steps_per_second"}
    assert {a.path for a in MlflowClient().list_artifacts(adapted[0].info.run_id, "clip")} == artifacts  # no weights
    assert child.data.tags["tta.inputs"] == {r.clip_id: r.content_hash for r in read_manifest(
        config.data.manifest)}[child.data.tags["tta.clip_id"]]
    assert child.data.tags["tta.weights"] == parent.data.tags["tta.weights"] and child.data.tags["git_commit"]
    assert {"repeat_last_psnr", "linear_motion_psnr"} <= set(child.data.metrics)
    assert "repeat_last_psnr" not in adapted[0].data.metrics
    # temporal consistency of the continuation, of the truth, and of repeating the last frame (none)
    assert {"warp_error", "flicker", "truth_warp_error", "truth_flicker"} <= set(child.data.metrics)
    assert child.data.metrics["repeat_last_warp_error"] == 0 == child.data.metrics["repeat_last_flicker"]
    # evaluation: paired stats, per-frame curves over [K, T), the reference beside the arms, artifacts
    psnr = primary(summary, "psnr")
    assert psnr["n"] == 3 and psnr["ci_low"] <= psnr["diff_mean"] <= psnr["ci_high"]
    # the link that opens MLflow 3's UI on the runs table, not its GenAI overview
    assert (f"/#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning"
            in capsys.readouterr().out)
    # each arm's own figures on its stage run, for MLflow's compare view
    found = MlflowClient().search_runs([parent.info.experiment_id], "tags.`tta.kind` = 'stage'")
    assert sorted(r.data.tags["tta.stage"] for r in found) == ["adapt", "baseline", "evaluate"]
    stage_runs = {r.data.tags["tta.stage"]: r for r in found}
    adapted_run = stage_runs["adapt"].data.metrics
    assert adapted_run["eval.psnr_gain"] == pytest.approx(psnr["diff_mean"])
    assert adapted_run["eval.psnr_gain_ci_low"] == pytest.approx(psnr["ci_low"]) and "eval.clips_failed" in adapted_run
    assert stage_runs["baseline"].data.metrics["eval.psnr_mean"] == pytest.approx(
        summary["arms"]["baseline"]["means"]["psnr"][0]) and "eval.psnr_gain" not in stage_runs["baseline"].data.metrics
    assert set(summary["arms"]) == {"baseline", "adapted", "repeat_last", "linear_motion"}
    assert summary["arms"]["adapted"]["failed"] == 0
    curve = summary["per_frame"]["psnr"]["differences"]["adapted - baseline"]
    assert curve["frame"] == [3, 4, 5] and all(lo <= m <= hi for lo, m, hi in zip(curve["ci_low"], curve["mean"],
                                                                                   curve["ci_high"]))
    eval_artifacts = {a.path for a in MlflowClient().list_artifacts(summary["run_id"])}
    assert {"metrics.json", "plots.html"} <= eval_artifacts
    path = MlflowClient().download_artifacts(summary["run_id"], "metrics.json")
    assert primary(json.loads(Path(path).read_text()), "ssim")["n"] == 3
    logged = mlflow.get_run(summary["run_id"]).data.metrics
    assert logged["adapted.clips_failed"] == 0 and "adapted-baseline.itt.psnr.holm_p_value" in logged
    assert {"baseline.continuity_psnr_mean", "adapted.first_frame_psnr_mean", "truth.continuity_psnr_mean"} <= set(
        logged)
    assert "does the prefix condition the model?" in format_table(summary)
    # the gain per minute of adaptation: the ITT gain over the adaptation's mean seconds per clip
    per_minute = psnr["diff_mean"] / (summary["cost"]["adapted.adapt_seconds"] / 60)
    assert summary["cost"]["adapted.psnr_gain_per_adapt_minute"] == pytest.approx(per_minute)
    assert adapted_run["eval.psnr_gain_per_adapt_minute"] == pytest.approx(per_minute)
    assert f"psnr {per_minute:+.4g}" in format_table(summary) and "peak memory" in format_table(summary)


def primary(summary: dict, metric: str, a: str = "adapted", b: str = "baseline", analysis: str = "ITT") -> dict:
    return next(c for c in summary["comparisons"] if (c["a"], c["b"], c["metric"]) == (a, b, metric)
                and c["analysis"].startswith(analysis))


def test_failed_adaptation_counts_as_no_change_beside_the_complete_case(prepared, store):
    config = load_config(prepared)
    run_stage(config, "baseline")
    run_stage(config, "adapt")
    failed = clip_runs("tiny", "adapt")[0]
    clip = failed.data.tags["tta.clip_id"]
    client = MlflowClient()
    client.set_tag(failed.info.run_id, "tta.error", "loss became nan within steps 1-3")
    client.set_terminated(failed.info.run_id, "FAILED")
    summary = evaluate(config)
    arm = summary["arms"]["adapted"]
    assert (arm["scored"], arm["failed"], arm["failure_rate"]) == (2, 1, pytest.approx(1 / 3))
    assert "nan" in arm["failures"][clip]
    itt, complete = primary(summary, "psnr"), primary(summary, "psnr", analysis="complete")
    assert itt["n"] == 3 and complete["n"] == 2 and clip not in complete["clips"]
    assert itt["differences"][itt["clips"].index(clip)] == 0  # scored as the baseline's own continuation
    assert itt["diff_mean"] == pytest.approx(sum(complete["differences"]) / 3)
    table = format_table(summary)
    assert "adapted failed on" in table and "1 (33%)" in table


def test_sham_arm_sits_beside_the_adapted_arm(prepared, store):
    config = load_config(prepared)
    run_stage(config, "baseline")
    run_stage(config, "adapt")
    sham_config = load_config(prepared, {"adaptation.data": "other"})
    run_stage(sham_config, "adapt")
    sham_runs = [r for r in clip_runs("tiny", "adapt") if r.data.tags["tta.digest"] == stage_digest(sham_config,
                                                                                                    "adapt")]
    assert len(sham_runs) == 3 and all(r.data.tags["tta.partner"] != r.data.tags["tta.clip_id"] for r in sham_runs)
    summary = evaluate(config)
    assert "SHAM" in summary["arms"]["sham"]["label"]
    assert primary(summary, "psnr", "adapted", "sham")["n"] == 3
    assert all(not math.isnan(c["holm_p_value"]) and c["holm_p_value"] >= c["t_p_value"]
               for c in summary["comparisons"] if not math.isnan(c["t_p_value"]))


def test_an_evaluate_that_finds_nothing_says_why_on_its_run(prepared, store):
    config = load_config(prepared)
    with pytest.raises(ValueError, match="has no adapt run with this config"):
        evaluate(config)
    failed = MlflowClient().search_runs([mlflow.get_experiment_by_name("tiny").experiment_id],
                                        "tags.`tta.stage` = 'evaluate'")
    assert failed[0].info.status == "FAILED" and "has no adapt run" in failed[0].data.tags["tta.error"]
    typed = subprocess.run(cli("evaluate", "--config", str(prepared)), capture_output=True, text=True)
    assert typed.returncode == 2 and "Traceback" not in typed.stderr
    assert typed.stderr.strip().splitlines()[-1].startswith("Error: experiment 'tiny' has no adapt run")


def test_fewer_than_two_paired_clips_are_said_in_words(prepared, store):
    config = load_config(prepared, {"data.num_clips": "1"})
    run_stage(config, "baseline")
    run_stage(config, "adapt")
    table = format_table(evaluate(config))
    assert "fewer than 2 paired clips: no statistics" in table and "nan" not in table


def test_a_changed_clip_is_redone_alone_and_stale_frames_are_refused(prepared, store, tmp_path):
    shutil.copytree(Path(load_config(prepared).data.manifest).parent, tmp_path / "data")
    config = load_config(prepared, {"data.output_dir": str(tmp_path / "data")})
    run_stage(config, "baseline")
    before = {r.data.tags["tta.clip_id"]: r.info.run_id for r in clip_runs("tiny", "baseline")}
    # one clip's target frames change, as preprocessing a changed source video writes them
    records = read_manifest(config.data.manifest)
    changed = next(r for r in records if r.split == "test")
    path = tmp_path / "data" / changed.path
    frames = read_video(path)[0]
    frames[config.data.context:] = 255 - frames[config.data.context:]
    write_clip(path, frames, 8)
    write_manifest(config.data.manifest, [ClipRecord(**{**r.__dict__, "content_hash": frames_hash(frames)})
                                          if r == changed else r for r in records])
    run_stage(config, "baseline")
    after = {r.info.run_id: r.data.tags["tta.clip_id"] for r in clip_runs("tiny", "baseline")}
    assert set(before.values()) < set(after) and [after[r] for r in set(after) - set(before.values())] == [
        changed.clip_id]
    # a clip file changed behind the manifest's back is refused, naming the file
    frames[:config.data.context] = 0
    write_clip(path, frames, 8)
    run_stage(load_config(prepared, {"data.output_dir": str(tmp_path / "data"), "sampling.steps": "2"}), "baseline")
    refused = [r for r in clip_runs("tiny", "baseline") if r.info.status == "FAILED"]
    assert len(refused) == 1 and refused[0].data.tags["tta.clip_id"] == changed.clip_id
    assert "content differs from the manifest's hash" in refused[0].data.tags["tta.error"]
    assert str(path) in refused[0].data.tags["tta.error"]


def test_results_of_other_weights_are_never_reused(prepared, store, tmp_path):
    from safetensors.torch import load_file, save_file

    config = load_config(prepared)
    run_stage(config, "baseline")
    state = load_file(config.model.ltx_video.weights)
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    retrained = tmp_path / "retrained.safetensors"
    save_file(state, str(retrained))
    other = load_config(prepared, {"model.weights": str(retrained)})
    assert stage_digest(other, "baseline") == stage_digest(config, "baseline")  # a path is not the key
    run_stage(other, "baseline")
    finished = [r for r in clip_runs("tiny", "baseline") if r.info.status == "FINISHED"]
    assert len(finished) == 6 and len({r.data.tags["tta.weights"] for r in finished}) == 2


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
    # through the CLI: the last line counts the failed clips and the exit code says so
    result = subprocess.run(cli("adapt", "--config", str(prepared), "--set", f"data.output_dir={out}",
                                "--set", "data.num_clips=0"), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"[adapt] 5 of {len(good) + 5} clips failed")
    runs = {r.data.tags["tta.clip_id"]: r for r in clip_runs("tiny", "adapt")}
    assert all(runs[r.clip_id].info.status == "FINISHED" for r in good)
    expected = {"corrupt": "not a readable video", "short": "too short: 2 frames", "text": "not a readable video",
                "missing": "file does not exist", "size": "frame size 24x16 differs"}
    for clip_id, reason in expected.items():
        run = runs[clip_id]
        assert run.info.status == "FAILED"
        assert reason in run.data.tags["tta.error"] and str(tmp_path) in run.data.tags["tta.error"]
    summary = evaluate(config)
    assert primary(summary, "psnr")["n"] == len(good)
    assert set(summary["excluded"]) == set(expected) and "too short" in summary["excluded"]["short"]


def test_mlflow_run_as_typed_lands_in_the_configs_experiment(prepared, store, tmp_path):
    """`mlflow run . -e adapt -P rank=16` with no other flag, offline: MLflow finds the environment
    `make` registered (here in a fresh env root) instead of building one with pyenv, and the run
    lands in the experiment the config names, under the arm's name; the run `mlflow run` opened in
    Default only points there. Run again, it finds every clip done and opens no stage run."""
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_ENV_ROOT": str(tmp_path / "envs")}
    subprocess.run([os.sys.executable, "-m", "pipeline.tracking.project_env"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    command = ["mlflow", "run", ".", "-e", "adapt", "-P", "rank=16", "-P", f"config={prepared}",
               "-P", "set=adaptation.warmup=0 adaptation.init_seed=3"]  # any other overrides
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = mlflow.get_experiment_by_name(load_config(prepared).experiment)
    parents = MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'stage' and "
                                                              "tags.`tta.stage` = 'adapt'")
    params = parents[0].data.params
    assert len(parents) == 1 and (params["adaptation.rank"], params["adaptation.warmup"]) == ("16", "0")
    assert params["adaptation.init_seed"] == "3" and parents[0].info.run_name == "lora-r16-lr0.001-3steps" and parents[0].info.status == "FINISHED"
    children = MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'clip' and tags.`tta.stage` = 'adapt'")
    assert len(children) == 3 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    typed = load_config(prepared, {"adaptation.rank": "16", "adaptation.warmup": "0", "adaptation.init_seed": "3"})
    assert stage_digest(typed, "adapt") == children[0].data.tags["tta.digest"]
    default = MlflowClient().search_runs(["0"])
    assert len(default) == 1 and default[0].data.tags["tta.moved_to"] == exp.name
    assert default[0].info.status == "FINISHED" and default[0].info.run_name == f"moved to {exp.name}"
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)  # every clip done
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    assert len(MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'stage'")) == 1
    launcher = [r for r in MlflowClient().search_runs(["0"]) if r.info.run_id != default[0].info.run_id]
    assert len(launcher) == 1 and launcher[0].info.run_name == "nothing to do: lora-r16-lr0.001-3steps"
    assert launcher[0].info.status == "FINISHED" and "tta.kind" not in launcher[0].data.tags


def test_an_arm_added_to_the_demo_with_mlflow_run_exactly_as_typed(store, tmp_path):
    """The demo's experiment (its clips and baseline, as `make demo` makes them), then
    `mlflow run . -e adapt -P rank=8` and `mlflow run . -e evaluate -P rank=8` with no other flag:
    the arm lands beside the demo's baseline and evaluate pairs it on all the demo's clips."""
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_ENV_ROOT": str(tmp_path / "envs")}
    subprocess.run([os.sys.executable, "-m", "pipeline.tracking.project_env"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    for stage in ("preprocess", "baseline"):
        subprocess.run(cli(stage, "--config", "conf/demo.yaml"), cwd=ROOT, env=env, check=True, capture_output=True)
    for entry in ("adapt", "evaluate"):
        result = subprocess.run(["mlflow", "run", ".", "-e", entry, "-P", "rank=8"], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    clips = load_config("conf/demo.yaml").data.num_clips
    assert "demo: lora r8 20 steps on context" in result.stdout and f"{clips} clips the baseline scored" in result.stdout
    demo = mlflow.get_experiment_by_name("demo").experiment_id
    stages = {r.info.run_name: r for r in MlflowClient().search_runs([demo], "tags.`tta.kind` = 'stage'")}
    assert set(stages) == {"preprocess", "baseline", "lora-r8-lr0.001-20steps", "evaluate lora-r8-lr0.001-20steps"}
    arm = stages["lora-r8-lr0.001-20steps"].data
    assert arm.params["adaptation.rank"] == "8" and arm.metrics["eval.clips_failed"] == 0
    assert math.isfinite(arm.metrics["eval.psnr_gain"])


def test_pretraining_new_settings_writes_beside_the_weights_results_refer_to(prepared, store):
    from pipeline.stages.pretrain import pretrain

    weights = Path(load_config(prepared).model.ltx_video.weights)
    kept = weights.read_bytes()
    other = load_config(prepared, {"pretrain.steps": "2"})
    written = pretrain(other)
    assert written != weights and written.parent == weights.parent
    assert weights.read_bytes() == kept
    assert pretrain(other) == written  # up to date now: found again, not retrained


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_killed_pretraining_resumes_to_the_same_weights(prepared, tmp_path, monkeypatch, ema):
    """A pretraining run cut off mid-way resumes from its checkpoint (weights, optimizer, moving
    average, batches and noise) and ends bitwise where an uninterrupted run ends."""
    from safetensors.torch import load_file

    from pipeline.stages import pretrain as stage

    config = load_config(prepared, {"pretrain.steps": "75", "pretrain.ema": ema})
    clips = stage.training_clips(config)
    whole = stage.train_weights(config, tmp_path / "whole.safetensors", clips)
    monkeypatch.setattr(stage, "CHECKPOINT_SECONDS", 0)  # a checkpoint at every log step (25, 50)

    def killed(step: int, loss: float) -> None:
        if step == 50:
            raise KeyboardInterrupt  # before the checkpoint at step 50: the one at 25 is the last
    cut = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        stage.train_weights(config, cut, clips, killed)
    assert not cut.exists() and cut.with_name(cut.name + ".resume").exists()
    stage.train_weights(config, cut, clips)
    assert not cut.with_name(cut.name + ".resume").exists()
    a, b = load_file(str(whole)), load_file(str(cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if ema != "0":  # what is written is the average, not the last weights of the same training
        raw = load_file(str(stage.train_weights(load_config(prepared, {"pretrain.steps": "75"}),
                                                tmp_path / "raw.safetensors", clips)))
        assert not all(torch.equal(a[k], raw[k]) for k in a)


@pytest.mark.parametrize("gpu", [False, True])
def test_stage_runs_ask_for_mlflow_system_metrics_on_a_gpu(prepared, store, monkeypatch, gpu):
    """With a CUDA device the stage run starts MLflow's system-metrics monitor. There is no GPU here, so
    the probe is told there is one: MLflow's real monitor then records what this machine has (CPU and
    memory; its GPU figures need NVML, i.e. a GPU)."""
    from pipeline.stages import continuation
    from pipeline.tracking import runs

    monkeypatch.setattr(runs, "gpu_present", lambda: gpu)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    run_clip = continuation.Continuer.run

    def slow_run(self, clip, *args):  # the monitor logs its first sample after an interval: give it several
        time.sleep(0.5)
        return run_clip(self, clip, *args)

    monkeypatch.setattr(continuation.Continuer, "run", slow_run)
    metrics = mlflow.get_run(run_stage(load_config(prepared), "baseline")).data.metrics
    assert metrics["clips_failed"] == 0
    assert ("system/cpu_utilization_percentage" in metrics) == gpu


def test_pretrain_refuses_a_backend_that_is_not_pretrained_here():
    """Open-Sora has no small default: pretraining it would train 1B+ random weights into the small
    default's file; the stage says so before rendering any clip."""
    from pipeline.stages.pretrain import pretrain

    with pytest.raises(ValueError, match="model.backend=opensora-v1.3 is not pretrained here"):
        pretrain(load_config(None, {"model.backend": "opensora-v1.3"}))


def test_eval_at_records_each_step_as_its_arm_and_evaluate_draws_the_curve(prepared, store, capsys):
    """One adaptation per clip records the arms of 0, 1 and 3 steps: an arm of 1 step run on its own then
    finds every clip done; evaluate prints the step curve and puts each step's gain on its stage run;
    a clip missing in one step's arm alone is redone for that arm only."""
    config = load_config(prepared, {"adaptation.steps": "3", "adaptation.eval_at": "0,1", "adaptation.lr": "0.01"})
    run_stage(config, "baseline")
    parent = run_stage(config, "adapt")
    digests = {s: stage_digest(load_config(prepared, {"adaptation.steps": str(s), "adaptation.lr": "0.01"}), "adapt")
               for s in (0, 1, 3)}
    assert digests[3] == stage_digest(config, "adapt")  # eval_at is not part of the key
    runs = clip_runs("tiny", "adapt")
    assert {s: sorted(r.info.status for r in runs if r.data.tags["tta.digest"] == d) for s, d in digests.items()} \
        == {s: ["FINISHED"] * 3 for s in digests}
    assert run_stage(load_config(prepared, {"adaptation.steps": "1", "adaptation.lr": "0.01"}), "adapt") == ""
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name("tiny").experiment_id
    stage_runs = {r.data.tags["tta.digest"]: r for r in client.search_runs(
        [experiment], "tags.`tta.stage` = 'adapt' and tags.`tta.kind` = 'stage'")}
    assert stage_runs[digests[1]].data.tags["mlflow.parentRunId"] == parent
    assert stage_runs[digests[1]].info.run_name == "lora-r4-lr0.01-1steps" and "lora r4 1 steps" in \
        stage_runs[digests[1]].data.tags["tta.arm"]
    assert stage_runs[digests[1]].info.status == "FINISHED" and stage_runs[digests[1]].data.params[
        "adaptation.steps"] == "1"

    summary = evaluate(config)
    curve = {row["steps"]: row for row in summary["step_curve"]}
    assert sorted(curve) == [0, 1, 3]
    assert curve[0]["gains"]["psnr"]["diff_mean"] == 0  # no step: the baseline, bit for bit
    final = next(r for r in summary["comparisons"] if (r["a"], r["b"], r["metric"]) == ("adapted", "baseline", "psnr")
                 and r["analysis"].startswith("ITT"))
    assert curve[3]["gains"]["psnr"]["diff_mean"] == final["diff_mean"]
    assert "step curve (adaptation.eval_at)" in capsys.readouterr().out
    gain = client.get_run(stage_runs[digests[1]].info.run_id).data.metrics["eval.psnr_gain"]
    assert gain == curve[1]["gains"]["psnr"]["diff_mean"]

    redo = next(r for r in runs if r.data.tags["tta.digest"] == digests[1])
    client.set_terminated(redo.info.run_id, "FAILED")
    run_stage(config, "adapt")
    after = clip_runs("tiny", "adapt")
    assert {s: sum(r.info.status == "FINISHED" for r in after if r.data.tags["tta.digest"] == d)
            for s, d in digests.items()} == {0: 3, 1: 3, 3: 3}
    assert len(after) == len(runs) + 1


def test_clips_adapted_together_are_recorded_one_by_one(prepared, store, tmp_path):
    """adaptation.clips_per_batch=2 over 3 clips (a pair, then one): every clip its own run and result,
    close to the arm adapted one clip at a time; a broken clip fails alone inside its pair."""
    config = load_config(prepared, {"sampling.clips_per_batch": "2", "adaptation.lr": "0.01"})
    alone = load_config(prepared, {"adaptation.lr": "0.01"})
    assert stage_digest(config, "adapt") != stage_digest(alone, "adapt")  # its own arm: not the same bits
    run_stage(alone, "adapt")
    run_stage(config, "adapt")
    runs = {r.data.tags["tta.digest"]: {} for r in clip_runs("tiny", "adapt")}
    for r in clip_runs("tiny", "adapt"):
        runs[r.data.tags["tta.digest"]][r.data.tags["tta.clip_id"]] = r
    batched, single = runs[stage_digest(config, "adapt")], runs[stage_digest(alone, "adapt")]
    assert sorted(batched) == sorted(single) and all(r.info.status == "FINISHED" for r in batched.values())
    for clip_id, run in batched.items():
        assert run.data.metrics["clips_per_batch"] in (1, 2) and "(2 clips per batch)" in run.data.tags["tta.arm"]
        assert run.data.metrics["psnr"] == pytest.approx(single[clip_id].data.metrics["psnr"], abs=1e-3)
    run_stage(config, "baseline")  # batched too: the arm pairs with the baseline of the same sampling settings
    summary = evaluate(config)
    assert primary(summary, "psnr")["n"] == 3 and summary["arms"]["adapted"]["failed"] == 0
    names = {r.info.run_name for r in MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("tiny").experiment_id], "tags.`tta.kind` = 'stage'")}
    assert {"baseline-b2", "lora-r4-lr0.01-3steps-b2"} <= names

    good = [r for r in read_manifest(config.data.manifest) if r.split == "test"]
    source = Path(config.data.manifest).parent
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    records = [ClipRecord(**{**r.__dict__, "path": str(source / r.path)}) for r in good]
    records.insert(1, ClipRecord("corrupt", "bad", str(tmp_path / "garbage.mp4"), 6, 8.0, 16, 16, "test", "x"))
    write_manifest(tmp_path / "data" / "manifest.csv", records)  # pairs: (good, corrupt), (good, good)
    broken = load_config(prepared, {"sampling.clips_per_batch": "2", "adaptation.lr": "0.01",
                                    "data.output_dir": str(tmp_path / "data"), "data.num_clips": "0"})
    run_stage(broken, "adapt")
    runs = {r.data.tags["tta.clip_id"]: r for r in clip_runs("tiny", "adapt")
            if r.data.tags["tta.digest"] == stage_digest(broken, "adapt")}
    assert {c: r.info.status for c, r in runs.items()} == {**{r.clip_id: "FINISHED" for r in good}, "corrupt": "FAILED"}
    assert "not a readable video" in runs["corrupt"].data.tags["tta.error"]


def test_eval_at_with_clips_adapted_together_records_every_point(prepared, store):
    """eval_at and sampling.clips_per_batch together (a pair, then one clip): every clip in every
    point's arm, so each batched arm of those steps finds every clip done."""
    settings = {"sampling.clips_per_batch": "2", "adaptation.lr": "0.01"}
    run_stage(load_config(prepared, {**settings, "adaptation.steps": "3", "adaptation.eval_at": "0,1"}), "adapt")
    digests = {s: stage_digest(load_config(prepared, {**settings, "adaptation.steps": str(s)}), "adapt") for s in (0, 1, 3)}
    runs = clip_runs("tiny", "adapt")
    assert {s: sorted(r.info.status for r in runs if r.data.tags["tta.digest"] == d) for s, d in digests.items()} \
        == {s: ["FINISHED"] * 3 for s in digests}
    assert run_stage(load_config(prepared, {**settings, "adaptation.steps": "1"}), "adapt") == ""
