"""Temporal consistency of a continuation, with no downloaded weights: each frame against the one
before it (the first generated frame against the last context frame, the seam).

- `warp_error`: the mean absolute difference (0-1 scale) between a frame and the previous frame
  warped onto it with classical optical flow (OpenCV's DIS, computed on the video itself): what
  motion does not explain. Lower is smoother; the truth's own value is logged beside it.
- `flicker`: the mean absolute change between consecutive frames (0-1 scale), motion included: a
  continuation that flickers more or less than the truth (`truth_flicker`) is jumpier or stiller
  than reality.

`extrapolate_motion` is a reference predictor built on the same flow: each pixel keeps moving as it
moved between the last two context frames.
"""
from __future__ import annotations

import cv2
import numpy as np

TEMPORAL_METRICS = ("warp_error", "flicker")


def temporal_metrics(previous: np.ndarray, frames: np.ndarray) -> dict[str, list[float]]:
    """Per frame of `frames` (N, H, W, 3) uint8, each against its predecessor (`previous`, (H, W, 3),
    for the first): {'warp_error': [...], 'flicker': [...]}."""
    video = np.concatenate([previous[None], frames]).astype(np.float32) / 255
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in np.concatenate([previous[None], frames])]
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    warp, flicker = [], []
    for t in range(1, len(video)):
        backward = flow.calc(grey[t], grey[t - 1], None)  # where each pixel of frame t was in frame t-1
        warp.append(float(np.abs(_warp(video[t - 1], backward) - video[t]).mean()))
        flicker.append(float(np.abs(video[t] - video[t - 1]).mean()))
    return {"warp_error": warp, "flicker": flicker}


def extrapolate_motion(before_last: np.ndarray, last: np.ndarray, count: int) -> np.ndarray:
    """`count` frames (N, H, W, 3) uint8 after `last`, continuing the motion from `before_last` to
    `last` at constant velocity: frame m samples `last` where its pixel was m frames earlier."""
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    backward = flow.calc(cv2.cvtColor(last, cv2.COLOR_RGB2GRAY), cv2.cvtColor(before_last, cv2.COLOR_RGB2GRAY), None)
    return np.stack([_warp(last, m * backward) for m in range(1, count + 1)])


def _warp(image: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """`image` sampled at each pixel plus its backward flow (H, W, 2)."""
    h, w = backward.shape[:2]
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=-1)
    map_xy = grid + backward
    return cv2.remap(image, map_xy[..., 0], map_xy[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
