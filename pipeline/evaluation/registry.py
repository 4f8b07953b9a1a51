"""Every metric the harness reports, described once: evaluate, the clip runs and the viewer read this.

A new metric: its computation in its own module (called from `Scorer` in metrics.py), one `Metric`
line below, and its row in docs/protocol.md (a test checks every name is there).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    better: str  # "higher", "lower", or "nearer the truth" (the truth's own value, `truth_<name>`)
    per: str  # "frame": per frame of [K, T), a clip's value the mean; "set": over an arm's set of clips
    weights: tuple[str, ...]  # the downloaded networks it needs (names in weights.py); () for none
    definition: str
    on_truth: bool = False  # also measured on the ground truth itself, to read an arm's value against

    @property
    def compared(self) -> bool:
        """Paired between arms clip by clip (a set metric has one value per arm, not per clip)."""
        return self.per == "frame" and self.better in ("higher", "lower")


REGISTRY = (
    Metric("psnr", "higher", "frame", (), "peak signal-to-noise ratio against the truth, dB, capped at 100"),
    Metric("ssim", "higher", "frame", (), "structural similarity against the truth (scikit-image's defaults)"),
    Metric("lpips", "lower", "frame", ("alexnet",), "learned perceptual distance to the truth (LPIPS, AlexNet)"),
    Metric("warp_error", "lower", "frame", (), "what optical flow from the previous frame does not explain, 0-1",
           on_truth=True),
    Metric("flicker", "nearer the truth", "frame", (), "mean absolute change from the previous frame, 0-1",
           on_truth=True),
    Metric("flolpips", "lower", "frame", ("alexnet", "raft_small"),
           "LPIPS map weighted by where the prediction's motion differs from the truth's (FloLPIPS; flow: "
           "RAFT-small)"),
    Metric("fvd", "lower", "set", ("i3d",), "Fréchet distance of I3D features of the arm's continuations to the "
           "truth's (StyleGAN-V's I3D)"),
)
METRICS = {m.name: m for m in REGISTRY}
FRAME_METRICS = tuple(m.name for m in REGISTRY if m.per == "frame")
COMPARED = tuple(m.name for m in REGISTRY if m.compared)
ON_TRUTH = tuple(m.name for m in REGISTRY if m.on_truth)
SET_METRICS = tuple(m.name for m in REGISTRY if m.per == "set")
LOWER_IS_BETTER = frozenset(m.name for m in REGISTRY if m.better == "lower")


def improved(metric: str, difference: float) -> bool:
    """Whether a nonzero change (new minus old) of a compared metric is an improvement."""
    return (difference < 0) == (metric in LOWER_IS_BETTER)
