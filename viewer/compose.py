"""Side-by-side frames and one composed video for a clip: context | ground truth | arm 1 | arm 2 ..."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.video_io import read_video, write_video

CONTEXT_COLOUR = np.array([230, 160, 0], np.uint8)  # bar over frames the model was given
GENERATED_COLOUR = np.array([0, 150, 230], np.uint8)  # bar over frames the model generated
BAR = 4


def clip_columns(videos: dict[str, dict[str, Path]]) -> tuple[dict[str, np.ndarray], int, float]:
    """Full-length columns from the clip artifacts of each arm: 'context' (frozen after K),
    'ground truth', then every arm's context + continuation (output.mp4: its first sample). Returns
    columns, K and fps."""
    first = next(iter(videos.values()))
    context, fps = read_video(first["context.mp4"])
    target, _ = read_video(first["target.mp4"])
    k = len(context)
    columns = {"context": np.concatenate([context, np.repeat(context[-1:] // 3, len(target), 0)]),
               "ground truth": np.concatenate([context, target])}
    for name, paths in videos.items():
        columns[name] = np.concatenate([context, read_video(paths["output.mp4"])[0]])
    return columns, k, fps


def mark_context(frames: np.ndarray, context: int) -> np.ndarray:
    """A coloured bar on top of each frame: context frames one colour, generated ones another."""
    out = frames.copy()
    out[:context, :BAR] = CONTEXT_COLOUR
    out[context:, :BAR] = GENERATED_COLOUR
    return out


def upscale(frames: np.ndarray, min_side: int = 192) -> np.ndarray:
    factor = max(1, -(-min_side // min(frames.shape[-3:-1])))
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def side_by_side_video(columns: dict[str, np.ndarray], context: int, fps: float, path: Path) -> Path:
    """One mp4 of all columns next to each other, so that they play, pause and seek together."""
    frames = [mark_context(upscale(c), context) for c in columns.values()]
    gap = np.full((*frames[0].shape[:2], 4, 3), 255, np.uint8)
    parts = [p for f in frames for p in (f, gap)][:-1]
    return write_video(path, np.concatenate(parts, axis=2), fps)
