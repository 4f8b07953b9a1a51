"""Clips from sources: the synthetic generator, or a folder of videos with one sub-folder per class.

Every clip has exactly T frames at the target fps and HxW size (resized to cover, centre-cropped).
Videos that cannot be used are listed with the reason in skipped.csv and left out of the manifest.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..progress import Progress
from .manifest import ClipRecord, write_manifest
from .synthetic import MOTION_CLASSES, render_clip
from .video_io import VideoError, read_video, write_video

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"}


def generate_synthetic(config: DataConfig, seed: int) -> tuple[list[ClipRecord], list[tuple[str, str]]]:
    out = Path(config.output_dir)
    records = []
    plan = [("train", i) for i in range(config.train_clips)] + [("test", i) for i in range(config.test_clips)]
    progress = Progress("preprocess", len(plan))
    for split, i in plan:
        label = MOTION_CLASSES[i % len(MOTION_CLASSES)]
        clip_id = f"{split}_{label}_{i:04d}"
        path = out / "clips" / f"{clip_id}.mp4"
        if not path.exists():  # generation is deterministic, so an existing file is this clip
            rng = np.random.default_rng([seed, split == "test", i])
            write_video(path, render_clip(label, config.frames, config.height, config.width, rng), config.fps)
        records.append(ClipRecord(clip_id, label, str(path.relative_to(out)), config.frames, config.fps,
                                  config.height, config.width, split, "synthetic"))
        progress.advance(clip_id)
    return records, []


def clips_from_folder(config: DataConfig) -> tuple[list[ClipRecord], list[tuple[str, str]]]:
    root = Path(config.input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data.input_dir={root} is not a directory (expected one sub-folder per class)")
    videos = sorted(p for p in root.rglob("*") if p.is_file() and p.parent != root)
    if not videos:
        raise FileNotFoundError(f"data.input_dir={root} has no files in class sub-folders")
    out = Path(config.output_dir)
    records, skipped = [], []
    progress = Progress("preprocess", len(videos))
    for video in videos:
        rel = video.relative_to(root)
        clip_id = "_".join(rel.with_suffix("").parts)
        try:
            if video.suffix.lower() not in VIDEO_SUFFIXES:
                raise VideoError(video, f"not a video file suffix ({video.suffix or 'none'})")
            frames = fit_clip(video, config)
            write_video(out / "clips" / f"{clip_id}.mp4", frames, config.fps)
            records.append(ClipRecord(clip_id, rel.parts[0], f"clips/{clip_id}.mp4", config.frames, config.fps,
                                      config.height, config.width, _split_of(str(rel), config.test_fraction),
                                      str(video)))
        except VideoError as exc:
            skipped.append((str(video), exc.reason))
            print(f"[preprocess] skipped {exc}", flush=True)
        progress.advance(clip_id)
    return records, skipped


def fit_clip(path: Path, config: DataConfig) -> np.ndarray:
    """T frames resampled to config.fps, resized to cover HxW and centre-cropped."""
    frames, fps = read_video(path)
    indices = np.floor(np.arange(config.frames) * fps / config.fps).astype(int)
    if indices[-1] >= len(frames):
        raise VideoError(path, f"too short: {len(frames)} frames at {fps:.2f} fps, need {config.frames} "
                               f"frames at {config.fps} fps ({indices[-1] + 1} source frames)")
    return resize_crop(frames[indices], config.height, config.width)


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    video = torch.as_tensor(frames).permute(0, 3, 1, 2).float()
    _, _, h, w = video.shape
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top:top + height, left:left + width]
    return video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _split_of(key: str, test_fraction: float) -> str:
    """A stable split from the file's path: the same video always lands in the same split."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


def preprocess(config: DataConfig, seed: int) -> tuple[Path, list[ClipRecord], list[tuple[str, str]]]:
    records, skipped = generate_synthetic(config, seed) if config.source == "synthetic" else clips_from_folder(config)
    manifest = write_manifest(config.manifest, records)
    with open(manifest.with_name("skipped.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("video", "reason"), *skipped])
    return manifest, records, skipped
