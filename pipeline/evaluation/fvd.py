"""Fréchet video distance with StyleGAN-V's TorchScript I3D (src/metrics/frechet_video_distance.py,
which matches the original TensorFlow FVD): each video, uint8 (B, 3, T, H, W), goes through the
network with rescale=True, resize=True (to 224 x 224 inside) and return_features=True (the 400
logits before the softmax); a set of videos is summarised by the mean and covariance of its
features (normalised by N, as StyleGAN-V's FeatureStats), and two sets are compared by the Fréchet
distance of those Gaussians. A set metric: noisy below a few hundred videos.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def load_i3d(path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def i3d_features(detector: torch.jit.ScriptModule, videos: np.ndarray, device: str | torch.device) -> np.ndarray:
    """(B, D) float64 features of (B, T, H, W, 3) uint8 videos."""
    x = torch.as_tensor(videos).to(device).permute(0, 4, 1, 2, 3)  # uint8, as StyleGAN-V feeds it
    return detector(x, rescale=True, resize=True, return_features=True).double().cpu().numpy()


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (normalised by N) of (N, D) features."""
    mean = features.mean(0)
    centred = features - mean
    return mean, centred.T @ centred / len(features)


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(np.real(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)))


def fvd(generated: np.ndarray, real: np.ndarray) -> float:
    """FVD between (N, D) and (M, D) feature sets."""
    return frechet_distance(*gaussian(generated), *gaussian(real))
