"""Batched PSNR and SSIM in torch, for evaluating many clips on a GPU.

SSIM ports scikit-image's `structural_similarity` defaults exactly: a 7x7 uniform window, sample
covariance (N/(N-1)), K1=0.01, K2=0.03, the mean over the pixels the window fully covers, and the
mean over colour channels. tests/test_gpu_metrics.py checks it against scikit-image to 1e-4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 7


def to_float(frames, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 (numpy or tensor) -> (N, 3, H, W) float32 on `device`, converted there (a
    quarter of the bytes to copy, and no float conversion on the host)."""
    return torch.as_tensor(frames).to(device).permute(0, 3, 1, 2).float()


def psnr(prediction: torch.Tensor, truth: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR of (N, C, H, W) tensors."""
    mse = (prediction - truth).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(prediction: torch.Tensor, truth: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) tensors, channels averaged."""
    n = WINDOW * WINDOW
    cov_norm = n / (n - 1)

    def mean(x: torch.Tensor) -> torch.Tensor:  # valid positions only: skimage crops the border
        return F.avg_pool2d(x, WINDOW, stride=1)

    ux, uy = mean(prediction), mean(truth)
    vx = cov_norm * (mean(prediction * prediction) - ux * ux)
    vy = cov_norm * (mean(truth * truth) - uy * uy)
    vxy = cov_norm * (mean(prediction * truth) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(2).mean(2).mean(1)
