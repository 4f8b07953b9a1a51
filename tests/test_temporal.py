"""Temporal consistency with classical optical flow: warp error and flicker, frame against frame."""
import cv2
import numpy as np

from pipeline.evaluation.temporal import temporal_metrics


def textured(size: int = 64) -> np.ndarray:
    noise = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(noise, (7, 7), 2)


def test_motion_the_flow_explains_has_little_warp_error_but_flickers():
    first = textured()
    panned = np.stack([np.roll(first, 2 * t, axis=1) for t in range(1, 6)])  # a camera pan, 2 px per frame
    pan = temporal_metrics(first, panned)
    noise = temporal_metrics(first, (np.random.default_rng(1).random((5, 64, 64, 3)) * 255).astype(np.uint8))
    still = temporal_metrics(first, np.repeat(first[None], 5, axis=0))
    assert len(pan["warp_error"]) == len(pan["flicker"]) == 5
    assert max(pan["warp_error"]) < 0.2 * min(pan["flicker"])  # the flow explains the pan
    assert min(noise["warp_error"]) > 10 * max(pan["warp_error"])  # nothing explains noise
    assert still == {"warp_error": [0.0] * 5, "flicker": [0.0] * 5}
