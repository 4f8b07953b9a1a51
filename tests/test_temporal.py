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


def test_motion_extrapolation_continues_a_pan_and_cannot_see_the_future():
    """The linear-motion reference predictor: a steady pan is continued almost exactly from the last
    two frames alone (far better than repeating the last frame)."""
    from pipeline.evaluation.temporal import extrapolate_motion

    world = textured(96)
    frames = np.stack([world[16:80, 16 + 2 * t: 80 + 2 * t] for t in range(8)])  # 2 px per frame
    predicted = extrapolate_motion(frames[4], frames[5], 2)
    assert predicted.shape == (2, 64, 64, 3) and predicted.dtype == np.uint8
    inner = (slice(None), slice(8, 56), slice(8, 48))  # away from the edge that enters the frame
    error = np.abs(predicted.astype(int) - frames[6:8].astype(int))[inner].mean()
    repeat = np.abs(frames[5:6].astype(int) - frames[6:8].astype(int))[inner].mean()
    assert error < 0.25 * repeat
