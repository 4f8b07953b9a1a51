"""Model backends, one per model family, behind `VideoBackend`."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from .base import FrameLayout, VideoBackend
from .ltx_video import LTXVideoBackend

__all__ = ["FrameLayout", "VideoBackend", "load_backend", "default_device"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backend(config: Config, random_weights: bool = False) -> VideoBackend:
    """The backend named by `config.model`. The small default needs the pretrain stage's weights
    unless `random_weights` (used by pretraining itself)."""
    m = config.model
    if m.backend != "ltx-video":
        raise ValueError(f"model.backend={m.backend!r} is not known; available: 'ltx-video'")
    common = dict(fps=config.data.fps, sampling_steps=config.sampling.steps, shift=config.sampling.shift,
                  decode_timestep=m.decode_timestep, device=default_device(), dtype=getattr(torch, m.dtype),
                  compile=m.compile)
    if m.pretrained:
        return LTXVideoBackend.from_pretrained(m.pretrained, m.prompt, **common)
    weights = None if random_weights else Path(m.weights)
    if weights is not None and not weights.exists():
        raise FileNotFoundError(f"model.weights={weights} does not exist: run the pretrain stage first "
                                f"(python -m pipeline pretrain) or point model.pretrained at a checkpoint")
    return LTXVideoBackend.small(weights, m.patch_size, m.layers, m.heads, m.head_dim, **common)
