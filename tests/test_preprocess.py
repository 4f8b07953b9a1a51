import csv
import shutil

import numpy as np
import pytest

from conftest import REAL_DATA, ROOT
from pipeline.config import DataConfig
from pipeline.data.manifest import read_manifest, resolve_clip_path
from pipeline.data.preprocess import preprocess, resize_crop
from pipeline.config import load_config
from pipeline.data.synthetic import MOTION_CLASSES, synthetic_clip
from pipeline.evaluation.metrics import frame_metrics
from pipeline.data.video_io import read_video, write_clip, write_video


def test_synthetic_clips_are_real_deterministic_videos(tmp_path):
    cfg = DataConfig(output_dir=str(tmp_path / "a"), frames=10, height=24, width=32, train_clips=8, test_clips=6,
                     seed=1)
    manifest, records, skipped = preprocess(cfg)
    assert skipped == [] and len(records) == 6  # the train split is rendered by pretraining, in memory
    assert {r.label for r in records} == set(MOTION_CLASSES)
    assert {r.split for r in records} == {"test"}
    frames, fps = read_video(resolve_clip_path(manifest, records[0]))
    assert frames.shape == (10, 24, 32, 3) and fps == pytest.approx(cfg.fps)
    assert frames.std(axis=0).mean() > 1  # something moves
    again = DataConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b")})
    manifest_b, records_b, _ = preprocess(again)
    first_a = read_video(resolve_clip_path(manifest, records[5]))[0]
    first_b = read_video(resolve_clip_path(manifest_b, records_b[5]))[0]
    assert np.array_equal(first_a, first_b)
    assert read_manifest(manifest) == records
    assert all(r.content_hash for r in records) and records == records_b  # the same hashes


def test_preprocess_twice_writes_byte_identical_clips(tmp_path):
    """Same inputs and config, same bytes: clip files and manifest (hashes included)."""
    cfg = DataConfig(output_dir=str(tmp_path / "out"), frames=10, height=24, width=32, train_clips=4, test_clips=4)
    manifest, records, _ = preprocess(cfg)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out" / "clips").iterdir()}
    first_manifest = manifest.read_bytes()
    preprocess(cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "clips").iterdir()} == first
    assert manifest.read_bytes() == first_manifest
    assert len({r.content_hash for r in records}) == len(records)


def test_changing_a_sources_target_frames_leaves_its_context_bitwise_unchanged(tmp_path):
    """Clips are stored intra-only and losslessly: no decoded context frame depends on frames >= K
    (an inter-frame codec such as x264 with B-frames fails this)."""
    K, T = 8, 16
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (T, 32, 32, 3), np.uint8)
    source = np.cumsum(source // 32, axis=0, dtype=np.uint8)  # frames that resemble each other
    changed = source.copy()
    changed[K:] = rng.integers(0, 256, changed[K:].shape, np.uint8)
    contexts = []
    for name, frames in (("a", source), ("b", changed)):
        root = tmp_path / name / "videos" / "walk"
        root.mkdir(parents=True)
        write_clip(root / "v.mkv", frames, fps=8)
        cfg = DataConfig(source="folder", input_dir=str(root.parent), output_dir=str(tmp_path / name / "out"),
                         frames=T, context=K, fps=8, height=32, width=32, test_fraction=1.0)
        manifest, records, _ = preprocess(cfg)
        decoded = read_video(resolve_clip_path(manifest, records[0]))[0]
        assert np.array_equal(decoded, frames)  # lossless
        contexts.append(decoded[:K])
    assert np.array_equal(*contexts)


def test_every_synthetic_clip_moves_and_repeating_the_last_frame_does_not_solve_it():
    """At the demo's size: no clip has two identical consecutive frames (train and test clips), and
    repeating the last context frame scores below 23 dB PSNR on the demo's test split (measured 21.2):
    there is motion to predict."""
    demo = load_config(ROOT / "conf" / "demo.yaml").data
    K = demo.context
    still, repeat_psnr = [], []
    for split, count in (("train", 36), ("test", demo.test_clips)):
        for i in range(count):
            clip_id, _, frames = synthetic_clip(demo, i, split)
            changes = np.abs(np.diff(frames.astype(int), axis=0)).reshape(len(frames) - 1, -1).max(1)
            if (changes == 0).any():
                still.append(clip_id)
            if split == "test":
                repeat_psnr.append(np.mean(frame_metrics(np.repeat(frames[K - 1:K], len(frames) - K, 0),
                                                         frames[K:])["psnr"]))
    assert not still
    assert np.mean(repeat_psnr) < 23


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
    manifest, records, skipped = preprocess(cfg)
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
    _, records, skipped = preprocess(cfg)
    assert sorted(r.label for r in records) == ["bikes", "makeup"]
    assert len(skipped) == 1 and "too short" in skipped[0][1]


def _video(path, frames=30, seed=0):
    rng = np.random.default_rng(seed)
    return write_video(path, rng.integers(0, 255, (frames, 48, 64, 3), np.uint8), 25)


def test_ucf101_layout_follows_the_official_split_and_samples_by_class(tmp_path):
    root, lists = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    train, test = [], []
    for c, label in enumerate(["ApplyEyeMakeup", "Biking", "Diving"]):
        for g in (1, 2, 8, 9):
            key = f"{label}/v_{label}_g{g:02d}_c01.avi"
            _video(root / key, seed=c * 10 + g)
            (test if g < 8 else train).append(key)
    (lists / "trainlist01.txt").write_text("".join(f"{k} {i % 3 + 1}\n" for i, k in enumerate(train)))
    (lists / "testlist01.txt").write_text("".join(f"{k}\n" for k in test))
    cfg = DataConfig(source="ucf101", input_dir=str(root), splits_dir=str(lists), output_dir=str(tmp_path / "out"),
                     frames=10, fps=25, height=32, width=32, sample=3, seed=5)
    _, records, skipped = preprocess(cfg)
    assert skipped == []
    for split, keys in (("train", train), ("test", test)):
        chosen = [r for r in records if r.split == split]
        assert len(chosen) == 3 and {r.label for r in chosen} == {"ApplyEyeMakeup", "Biking", "Diving"}
        assert all(r.source.endswith(tuple(keys)) for r in chosen)
    again = preprocess(DataConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "again")}))[1]
    assert [r.clip_id for r in again] == [r.clip_id for r in records]


def test_hmdb51_layout_leaves_out_unused_videos(tmp_path):
    root, lists = tmp_path / "videos", tmp_path / "testTrainMulti_7030_splits"
    lists.mkdir()
    for label in ("brush_hair", "wave"):
        lines = []
        for i, code in enumerate(("1", "2", "0")):
            _video(root / label / f"{label}_{i}.avi", seed=i)
            lines.append(f"{label}_{i}.avi {code}\n")
        (lists / f"{label}_test_split1.txt").write_text("".join(lines))
    _video(root / "wave" / "short.avi", frames=4)
    (lists / "wave_test_split1.txt").write_text((lists / "wave_test_split1.txt").read_text() + "short.avi 2\n")
    cfg = DataConfig(source="hmdb51", input_dir=str(root), splits_dir=str(lists), output_dir=str(tmp_path / "out"),
                     frames=12, fps=25, height=32, width=32, start_frame=2)
    _, records, skipped = preprocess(cfg)
    assert sorted((r.clip_id, r.split) for r in records) == [
        ("brush_hair_brush_hair_0", "train"), ("brush_hair_brush_hair_1", "test"), ("wave_wave_0", "train"),
        ("wave_wave_1", "test")]
    reasons = dict(skipped)
    assert reasons[str(root / "wave" / "wave_2.avi")] == "not in hmdb51 split 1"
    assert "too short" in reasons[str(root / "wave" / "short.avi")]
    assert all(r.start_frame == 2 for r in records)


def test_rar_extractor_is_checked_first(monkeypatch, tmp_path):
    from pipeline.data import datasets

    monkeypatch.setenv("PATH", str(tmp_path))  # no unar anywhere
    with pytest.raises(RuntimeError, match="apt-get install unar"):
        datasets.download_dataset("ucf101", tmp_path / "ucf")
    assert not (tmp_path / "ucf").exists()  # nothing downloaded before the check
