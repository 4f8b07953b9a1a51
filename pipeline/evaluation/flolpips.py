"""FloLPIPS (Danier, Zhang, Bull 2022, "FloLPIPS: a bespoke video quality metric for frame
interpolation"), as its official code (github.com/danier97/flolpips) computes it: for frame i of the
prediction and the truth, each LPIPS layer's spatial distance map is averaged with weights, the
magnitude of the difference between the truth's and the prediction's optical flow from frame i to
frame i+1 (resized bilinearly to the layer's size, normalised to sum 1), and the layers summed.
Every frame with a successor gets a value: N-1 of N frames.

Where this departs from the official code: the flow network is torchvision's RAFT-small (C_T_V2),
not PWC-Net, so values differ from the paper's; the weights are normalised per frame (the official
code normalises over its batch of 8 frames, which makes a frame's value depend on its batch); where
the two flows agree everywhere the weights are uniform (plain LPIPS) instead of 0/0; frames are
not round-tripped through YUV 4:2:0; frames under 128 px (RAFT-small's minimum) are upsampled for
the flow.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .gpu_metrics import to_float

MIN_SIZE = 128  # RAFT-small's 4-level correlation pyramid on 1/8-resolution features needs 16 px there
FLOW_BATCH = 64  # frame pairs per RAFT call


def load_flow_network(path, device: str | torch.device = "cpu") -> torch.nn.Module:
    from torchvision.models.optical_flow import raft_small

    model = raft_small()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


@torch.no_grad()
def optical_flow(model: torch.nn.Module, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) flow from each frame of `first` to the same frame of `second`, (N, 3, H, W) in [-1, 1].
    Frames smaller than MIN_SIZE are upsampled for RAFT and the flow brought back to their size."""
    h, w = first.shape[-2:]
    scale = math.ceil(MIN_SIZE / min(h, w))
    if scale > 1:
        first, second = (F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
                         for x in (first, second))
    pad = (0, -first.shape[-1] % 8, 0, -first.shape[-2] % 8)  # RAFT needs sizes divisible by 8
    first, second = F.pad(first, pad, mode="replicate"), F.pad(second, pad, mode="replicate")
    # RAFT's last refinement, in chunks: cuDNN's grid sampler refuses its correlation lookup for 511
    # pairs of 256 px at once
    flow = torch.cat([model(a, b)[-1] for a, b in zip(first.split(FLOW_BATCH), second.split(FLOW_BATCH))])
    flow = flow[..., :h * scale, :w * scale]
    return flow if scale == 1 else F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) / scale


def lpips_layer_maps(model, prediction: torch.Tensor, truth: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's LPIPS distance map (N, 1, h_l, w_l) of frames in [-1, 1]: their spatial means sum to
    the lpips package's value."""
    import lpips

    a, b = model.net(model.scaling_layer(prediction)), model.net(model.scaling_layer(truth))
    return [lin((lpips.normalize_tensor(x) - lpips.normalize_tensor(y)) ** 2) for lin, x, y in zip(model.lins, a, b)]


def flow_weighted_sum(maps: list[torch.Tensor], flow_difference: torch.Tensor) -> torch.Tensor:
    """Per frame, Σ_l Σ_xy map_l · w_l with w_l = |flow difference| resized to layer l, normalised to sum 1."""
    total = torch.zeros(flow_difference.shape[0], device=flow_difference.device)
    for distance in maps:
        flow = F.interpolate(flow_difference, size=distance.shape[-2:], mode="bilinear", align_corners=False)
        magnitude = flow.norm(dim=1, keepdim=True)
        mass = magnitude.sum(dim=(2, 3), keepdim=True)
        weight = torch.where(mass > 0, magnitude / mass.clamp_min(torch.finfo(mass.dtype).tiny),
                             1.0 / magnitude[0].numel())
        total += (distance * weight).sum(dim=(1, 2, 3))
    return total


@torch.no_grad()
def flolpips_tensors(prediction: torch.Tensor, truth: torch.Tensor, lpips_model, flow_model) -> torch.Tensor:
    """FloLPIPS of frames 0..N-2 of (N, 3, H, W) videos in [-1, 1]."""
    difference = optical_flow(flow_model, truth[:-1], truth[1:]) - optical_flow(flow_model, prediction[:-1],
                                                                                 prediction[1:])
    return flow_weighted_sum(lpips_layer_maps(lpips_model, prediction[:-1], truth[:-1]), difference)


def flolpips(prediction: np.ndarray, truth: np.ndarray, lpips_model, flow_model) -> list[float]:
    """Per frame with a successor of (N, H, W, 3) uint8 videos (N-1 values)."""
    device = next(lpips_model.parameters()).device
    p, t = to_float(prediction, device) / 127.5 - 1, to_float(truth, device) / 127.5 - 1
    return [float(x) for x in flolpips_tensors(p, t, lpips_model, flow_model)]
