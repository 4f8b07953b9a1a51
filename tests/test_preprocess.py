import csv
import shutil

import numpy as np
import pytest

from conftest import REAL_DATA
from pipeline.config import DataConfig
from pipeline.data.manifest import read_manifest, resolve_clip_path
from pipeline.data.preprocess import preprocess, resize_crop
from pipeline.data.synthetic import MOTION_CLASSES
from pipeline.data.video_io import read_video, write_video


def test_synthetic_clips_are_real_deterministic_videos(tmp_path):
    cfg = DataConfig(output_dir=str(tmp_path / "a"), frames=10, height=24, width=32, train_clips=8, test_clips=4)
    manifest, records, skipped = preprocess(cfg, seed=1)
    assert skipped == [] and len(records) == 12
    assert {r.label for r in records} == set(MOTION_CLASSES)
    assert [r.split for r in records].count("test") == 4
    frames, fps = read_video(resolve_clip_path(manifest, records[0]))
    assert frames.shape == (10, 24, 32, 3) and fps == pytest.approx(cfg.fps)
    assert frames.std(axis=0).mean() > 1  # something moves
    again = DataConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b")})
    manifest_b, records_b, _ = preprocess(again, seed=1)
    first_a = read_video(resolve_clip_path(manifest, records[5]))[0]
    first_b = read_video(resolve_clip_path(manifest_b, records_b[5]))[0]
    assert np.array_equal(first_a, first_b)
    assert read_manifest(manifest) == records


def test_resize_crop_covers_and_centres():
    frames = np.zeros((2, 100, 300, 3), np.uint8)
    frames[:, :, 140:160] = 255  # a bright vertical bar in the middle
    out = resize_crop(frames, 32, 32)
    assert out.shape == (2, 32, 32, 3)
    assert out[0, :, 14:18].mean() > 200 and out[0, :, :5].mean() < 5


def _folder_with_classes(tmp_path, videos):
    root = tmp_path / "videos"
    for label, name, source in videos:
        (root / label).mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            (root / label / name).write_bytes(source)
        else:
            shutil.copy(source, root / label / name)
    return root


def test_folder_preprocess_keeps_good_and_lists_bad(tmp_path):
    good = write_video(tmp_path / "g.mp4", np.random.default_rng(0).integers(0, 255, (40, 60, 80, 3), np.uint8), 30)
    short = write_video(tmp_path / "s.mp4", np.zeros((5, 60, 80, 3), np.uint8), 30)
    root = _folder_with_classes(tmp_path, [("walk", "a.mp4", good), ("walk", "short.mp4", short),
                                           ("run", "notes.txt", b"hello"), ("run", "broken.mp4", b"garbage")])
    cfg = DataConfig(source="folder", input_dir=str(root), output_dir=str(tmp_path / "out"), frames=12, fps=15,
                     height=32, width=32, test_fraction=0.5)
    manifest, records, skipped = preprocess(cfg, seed=0)
    assert [r.clip_id for r in records] == ["walk_a"] and records[0].label == "walk"
    reasons = dict(skipped)
    assert "too short" in reasons[str(root / "walk" / "short.mp4")]
    assert "not a video file suffix" in reasons[str(root / "run" / "notes.txt")]
    assert "not a readable video" in reasons[str(root / "run" / "broken.mp4")]
    with open(manifest.with_name("skipped.csv")) as f:
        assert len(list(csv.reader(f))) == 4  # header + 3
    frames, _ = read_video(resolve_clip_path(manifest, records[0]))
    assert frames.shape == (12, 32, 32, 3)


@pytest.mark.skipif(not REAL_DATA.exists(), reason="../shared/data/real is absent (only in the project's workspace)")
def test_real_videos_through_preprocess(tmp_path):
    root = _folder_with_classes(tmp_path, [("makeup", "ucf.avi", REAL_DATA / "ucf101_ApplyEyeMakeup_sample.avi"),
                                           ("bikes", "bikes.mp4", REAL_DATA / "bikes.mp4"),
                                           ("misc", "short.mp4", REAL_DATA / "short_32frames.mp4")])
    cfg = DataConfig(source="folder", input_dir=str(root), output_dir=str(tmp_path / "out"), frames=45, fps=25,
                     height=64, width=64)
    _, records, skipped = preprocess(cfg, seed=0)
    assert sorted(r.label for r in records) == ["bikes", "makeup"]
    assert len(skipped) == 1 and "too short" in skipped[0][1]
