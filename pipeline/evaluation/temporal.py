"""Temporal consistency of a continuation, with no downloaded weights: each frame against the one
before it (the first generated frame against the last context frame, the seam).

- `warp_error`: the mean absolute difference (0-1 scale) between a frame and the previous frame
  warped onto it with classical optical flow (OpenCV's DIS, computed on the video itself): what
  motion does not explain. Lower is smoother; the truth's own value is logged beside it.
- `flicker`: the mean absolute change between consecutive frames (0-1 scale), motion included: a
  continuation that flickers more or less than the truth (`truth_flicker`) is jumpier or stiller
  than reality.
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
    h, w = grey[0].shape
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=-1)
    warp, flicker = [], []
    for t in range(1, len(video)):
        backward = flow.calc(grey[t], grey[t - 1], None)  # where each pixel of frame t was in frame t-1
        map_xy = grid + backward
        warped = cv2.remap(video[t - 1], map_xy[..., 0], map_xy[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        warp.append(float(np.abs(warped - video[t]).mean()))
        flicker.append(float(np.abs(video[t] - video[t - 1]).mean()))
    return {"warp_error": warp, "flicker": flicker}
