"""Clips from sources: the synthetic generator, or a folder of videos with one sub-folder per class.

Every clip has exactly T frames at the target fps and HxW size (resized to cover, centre-cropped),
stored losslessly (`write_clip`) with its content hash in the manifest. The same inputs and config
give byte-identical clip files. Videos that cannot be used are listed with the reason in skipped.csv
and left out of the manifest.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..runtime.progress import Progress
from .datasets import official_splits, stratified_sample
from .manifest import ClipRecord, write_manifest
from .synthetic import synthetic_clip
from .video_io import VideoError, frames_hash, read_video, write_clip

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"}


def store_clip(config: DataConfig, clip_id: str, label: str, frames: np.ndarray, split: str, source: str,
               start_frame: int = 0) -> ClipRecord:
    """Write one clip losslessly under `<output_dir>/clips/` and return its manifest row."""
    path = f"clips/{clip_id}.mkv"
    write_clip(Path(config.output_dir) / path, frames, config.fps)
    return ClipRecord(clip_id, label, path, config.frames, config.fps, config.height, config.width, split, source,
                      start_frame, frames_hash(frames))


def generate_synthetic(config: DataConfig) -> tuple[list[ClipRecord], list[tuple[str, str]]]:
    """The test split's clips (the train split is rendered by pretraining itself, in memory)."""
    records = []
    progress = Progress("preprocess", config.test_clips)
    for i in range(config.test_clips):
        clip_id, label, frames = synthetic_clip(config, i, "test")
        records.append(store_clip(config, clip_id, label, frames, "test", "synthetic"))
        progress.advance(clip_id)
    return records, []


def clips_from_folder(config: DataConfig) -> tuple[list[ClipRecord], list[tuple[str, str]]]:
    """Videos in class sub-folders (the official UCF-101 / HMDB51 layout too), or directly in the
    folder (their class is then the folder's name)."""
    root = Path(config.input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data.input_dir={root} is not a directory of videos")
    videos = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not videos:
        raise FileNotFoundError(f"data.input_dir={root} holds no files")
    splits, skipped = _assign_splits(config, root, videos)
    chosen = [(key, split) for split in ("train", "test") for key in _sample(config, splits, split)]
    records = []
    progress = Progress("preprocess", len(chosen))
    for key, split in chosen:
        video = root / key
        rel = Path(key)
        clip_id = "_".join(rel.with_suffix("").parts)
        try:
            if video.suffix.lower() not in VIDEO_SUFFIXES:
                raise VideoError(video, f"not a video file suffix ({video.suffix or 'none'})")
            records.append(store_clip(config, clip_id, _label(rel, root), fit_clip(video, config), split,
                                      str(video), config.start_frame))
        except VideoError as exc:
            skipped.append((str(video), exc.reason))
            print(f"[preprocess] skipped {exc}", flush=True)
        progress.advance(clip_id)
    return records, skipped


def _assign_splits(config: DataConfig, root: Path, videos: list[Path]):
    """key ('Class/video.avi') -> split, and the videos left out with the reason."""
    keys = [v.relative_to(root).as_posix() for v in videos]
    if config.source == "folder":
        return {k: _split_of(k, config.test_fraction) for k in keys}, []
    official = official_splits(config.source, Path(config.splits_dir), config.split_id)
    skipped = [(str(root / k), f"not in {config.source} split {config.split_id}") for k in keys if k not in official]
    return {k: official[k] for k in keys if k in official}, skipped


def _sample(config: DataConfig, splits: dict[str, str], split: str) -> list[str]:
    items = [(k, _label(Path(k), Path(config.input_dir))) for k, s in splits.items() if s == split]
    return [k for k, _ in stratified_sample(items, config.sample, config.seed)]


def _label(relative: Path, root: Path) -> str:
    """A video's class: its sub-folder, or the folder's own name for a video directly in it."""
    return relative.parts[0] if len(relative.parts) > 1 else root.name


def fit_clip(path: Path, config: DataConfig) -> np.ndarray:
    """T frames from config.start_frame resampled to config.fps, resized to cover HxW, centre-cropped."""
    frames, fps = read_video(path)
    indices = config.start_frame + np.floor(np.arange(config.frames) * fps / config.fps).astype(int)
    if indices[-1] >= len(frames):
        raise VideoError(path, f"too short: {len(frames)} frames at {fps:.2f} fps, need {config.frames} frames at "
                               f"{config.fps} fps from frame {config.start_frame} ({indices[-1] + 1} source frames)")
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


def preprocess(config: DataConfig) -> tuple[Path, list[ClipRecord], list[tuple[str, str]]]:
    if config.source == "synthetic":
        records, skipped = generate_synthetic(config)
    else:
        records, skipped = clips_from_folder(config)
    manifest = write_manifest(config.manifest, records)
    with open(manifest.with_name("skipped.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("video", "reason"), *skipped])
    return manifest, records, skipped
