"""The metrics of a continuation (registry.py describes each): per frame PSNR, SSIM (torch ports of
scikit-image's, batched on the model's device), LPIPS (lpips package), warp error and flicker
(temporal.py) and FloLPIPS (flolpips.py); per clip the I3D features FVD is computed from over an
arm's clips (fvd.py). `Scorer` loads the networks they need once per stage."""
from __future__ import annotations

import numpy as np
import torch

from .flolpips import flolpips, load_flow_network
from .fvd import i3d_features, load_i3d
from .gpu_metrics import psnr, ssim, to_float
from .registry import LOWER_IS_BETTER, METRICS  # noqa: F401  (LOWER_IS_BETTER: for pipeline/stages/sweep.py)
from .temporal import temporal_metrics
from .weights import WEIGHTS, WeightsUnavailable, required

PSNR_CAP = 100.0  # identical frames have infinite PSNR; capped so that means stay finite


def load_lpips(net: str = "alex", device: str | torch.device = "cpu"):
    """LPIPS with its pretrained backbone, or WeightsUnavailable saying how to fetch the weights.
    A random backbone is never used for reported values."""
    import lpips

    if net != "alex":
        raise WeightsUnavailable(f"lpips unavailable: evaluation.lpips_net={net!r}, only 'alex' is supported")
    required("lpips", METRICS["lpips"].weights)
    return lpips.LPIPS(net=net, pretrained=True, verbose=False).to(device).eval()


class Scorer:
    """The networks of the metrics that need weights, loaded once on the model's device; a metric
    whose weights are absent is left out, and `unavailable` says why (metric -> one line).
    `networks`: metric -> the networks its values depend on, in words, for the runs' tags."""

    def __init__(self, lpips: bool, lpips_net: str, device: str | torch.device):
        self.device = device
        self.unavailable: dict[str, str] = {}
        self.lpips = self.flow = self.i3d = None
        if lpips:
            self.lpips = self._load("lpips", load_lpips, lpips_net, device)
            flow = self._load("flolpips", lambda: load_flow_network(
                required("flolpips", METRICS["flolpips"].weights)["raft_small"], device))
            self.flow = flow if self.lpips is not None else None  # FloLPIPS weights LPIPS's own distance maps
        self.i3d = self._load("fvd", lambda: load_i3d(required("fvd", METRICS["fvd"].weights)["i3d"], device))
        loaded = {"lpips": self.lpips, "flolpips": self.flow, "fvd": self.i3d}
        self.networks = {m: " + ".join(WEIGHTS[w].network for w in METRICS[m].weights)
                         for m, net in loaded.items() if net is not None}

    def _load(self, metric: str, load, *args):
        try:
            return load(*args)
        except WeightsUnavailable as exc:
            self.unavailable[metric] = str(exc)
            return None

    def frames(self, prediction: np.ndarray, truth: np.ndarray, last_context: np.ndarray) -> dict[str, list[float]]:
        """Per-frame scores of a continuation of the last context frame: against the truth, and each
        frame against the one before it (warp error, flicker); FloLPIPS per frame with a successor."""
        scores = {**frame_metrics(prediction, truth, self.lpips, self.device), **temporal_metrics(last_context,
                                                                                                    prediction)}
        if self.flow is not None and len(prediction) > 1:
            scores["flolpips"] = flolpips(prediction, truth, self.lpips, self.flow)
        return scores

    def check_fvd_input(self, frames: int, height: int, width: int) -> None:
        """I3D pools over time down to a minimum length (it fails on videos below about 10 frames;
        StyleGAN-V scores 16 or more): one blank video of the continuation's shape through it here,
        so that a continuation it cannot take leaves FVD unavailable instead of failing every clip."""
        if self.i3d is None:
            return
        try:
            self.features(np.zeros((1, frames, height, width, 3), dtype=np.uint8))
        except (RuntimeError, torch.jit.Error) as exc:
            self.i3d = None
            self.networks.pop("fvd")
            # a TorchScript error's last line is the failing operation's own message
            reason = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
            self.unavailable["fvd"] = (f"fvd unavailable: I3D cannot take {frames}-frame continuations of "
                                       f"{height}x{width} ({reason}); FVD is usually computed on 16 frames or more")

    def features(self, videos: np.ndarray) -> np.ndarray | None:
        """(B, D) I3D features of (B, T, H, W, 3) uint8 videos, for FVD; None without the network."""
        return None if self.i3d is None else i3d_features(self.i3d, videos, self.device)


@torch.no_grad()
def frame_metrics(prediction: np.ndarray, truth: np.ndarray, lpips_model=None,
                  device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Per-frame metrics of (N, H, W, 3) uint8 frames: {'psnr': [...], 'ssim': [...], 'lpips': [...]}."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
    p, t = to_float(prediction, device), to_float(truth, device)
    result = {"psnr": psnr(p, t).clamp(max=PSNR_CAP).tolist(), "ssim": ssim(p, t).tolist()}
    if lpips_model is not None:
        result["lpips"] = lpips_distances(prediction, truth, lpips_model)
    return {k: [float(x) for x in v] for k, v in result.items()}


@torch.no_grad()
def lpips_distances(prediction: np.ndarray, truth: np.ndarray, model) -> list[float]:
    device = next(model.parameters()).device
    return model(to_float(prediction, device) / 127.5 - 1, to_float(truth, device) / 127.5 - 1).flatten().tolist()
