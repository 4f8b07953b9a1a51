"""A user's own folder of videos through the README's commands, with the committed small model."""
import shutil
import subprocess

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REAL_DATA, ROOT, cli
from pipeline.config import load_config

VIDEOS = ["bikes.mp4", "carphone_pristine.mp4", "kinetics_armwrestling.mp4"]


def test_a_folder_preset_gets_its_own_data_folder_and_experiment():
    config = load_config(ROOT / "conf/folder.yaml", {"data.input_dir": "/somewhere/holiday"})
    assert (config.data.output_dir, config.experiment) == ("data/holiday", "holiday")
    assert config.data.test_fraction == 1.0 and config.pretrain.steps == 0
    demo = load_config(ROOT / "conf/demo.yaml")
    assert config.model == demo.model and config.adaptation == demo.adaptation  # `base: demo.yaml`


@pytest.mark.skipif(not all((REAL_DATA / v).exists() for v in VIDEOS), reason=f"real clips not found in {REAL_DATA}")
def test_three_real_videos_through_the_readme_commands(store, tmp_path):
    videos = tmp_path / "my_videos"
    videos.mkdir()
    for name in VIDEOS:
        shutil.copy(REAL_DATA / name, videos / name)
    demo_manifest = ROOT / "data/synthetic/manifest.csv"
    before = demo_manifest.read_bytes() if demo_manifest.exists() else None
    out = tmp_path / "data" / "my_videos"  # the preset's own default is data/my_videos under the working directory
    prep = subprocess.run(cli("preprocess", "--config", "conf/folder.yaml", "--set", f"data.input_dir={videos}",
                              "--set", f"data.output_dir={out}"), cwd=ROOT, capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert f"next: python -m pipeline experiment --config {out / 'config.yaml'}" in prep.stdout
    run = subprocess.run(cli("experiment", "--config", str(out / "config.yaml")), cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "my_videos: lora r16 20 steps on context" in run.stdout and "3 clips the baseline scored" in run.stdout
    exp = mlflow.get_experiment_by_name("my_videos")
    clips = MlflowClient().search_runs([exp.experiment_id], "tags.`tta.kind` = 'clip'")
    assert len(clips) == 9 and all(c.info.status == "FINISHED" for c in clips)  # baseline, adapted, sham
    assert {c.data.tags["tta.class"] for c in clips} == {"my_videos"}
    assert (demo_manifest.read_bytes() if demo_manifest.exists() else None) == before
