"""Per-frame PSNR, SSIM (torch ports of scikit-image's, batched on the model's device) and LPIPS
(lpips package) of a continuation against the truth, and its frame-to-frame consistency
(temporal.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .gpu_metrics import psnr, ssim, to_float
from .temporal import temporal_metrics

# the per-frame scores evaluate compares between arms: against the truth (`frame_metrics`), and the
# warping error of each frame against the one before it (`temporal_metrics`)
METRICS = ("psnr", "ssim", "lpips", "warp_error")
LOWER_IS_BETTER = {"lpips", "warp_error"}  # PSNR and SSIM: higher is better
PSNR_CAP = 100.0  # identical frames have infinite PSNR; capped so that means stay finite
FETCH_COMMAND = "python -m pipeline fetch-weights"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, the LPIPS backbone


def backbone_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


class LpipsUnavailable(RuntimeError):
    pass


def load_lpips(net: str = "alex", device: str | torch.device = "cpu"):
    """LPIPS with its pretrained backbone, or LpipsUnavailable saying how to fetch the weights.
    A random backbone is never used for reported values."""
    import lpips

    if net != "alex":
        raise LpipsUnavailable(f"evaluation.lpips_net={net!r}: only 'alex' is supported")
    if not backbone_weights_path().exists():
        raise LpipsUnavailable(
            f"LPIPS unavailable: AlexNet weights not found at {backbone_weights_path()}. "
            f"Fetch them once on a machine with internet: `{FETCH_COMMAND}` (set TORCH_HOME to share them)."
        )
    return lpips.LPIPS(net=net, pretrained=True, verbose=False).to(device).eval()


def fetch_lpips_weights() -> Path:
    """Download the AlexNet backbone into the torch hub cache (run once, on a node with internet)."""
    from torchvision.models import AlexNet_Weights, alexnet

    alexnet(weights=AlexNet_Weights.IMAGENET1K_V1)
    return backbone_weights_path()


def continuation_metrics(prediction: np.ndarray, truth: np.ndarray, last_context: np.ndarray, lpips_model=None,
                         device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Per-frame scores of a continuation of the last context frame: against the truth, and each frame
    against the one before it (warp error, flicker)."""
    return {**frame_metrics(prediction, truth, lpips_model, device), **temporal_metrics(last_context, prediction)}


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
