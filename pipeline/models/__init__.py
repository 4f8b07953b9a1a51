"""Model backends, one per model family, behind `VideoBackend`."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import ranks
from ..config import Config
from .base import FrameLayout, VideoBackend
from .ltx_video import LTXVideoBackend
from .opensora_v13 import OpenSoraV13Backend
from .opensora_v20 import OpenSoraV20Backend
from .skyreels_v2 import GUIDANCE as SKYREELS_GUIDANCE, SkyReelsV2Backend

__all__ = ["FrameLayout", "VideoBackend", "load_backend", "default_device", "reference_deviations"]


def default_device() -> torch.device:
    return torch.device("cuda", ranks.local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def load_backend(config: Config, random_weights: bool = False) -> VideoBackend:
    """The backend named by `config.model`. The small LTX default needs the pretrain stage's weights
    unless `random_weights` (used by pretraining itself)."""
    m, s = config.model, config.sampling
    device, dtype = default_device(), getattr(torch, m.dtype)
    if m.backend == "opensora-v1.3":
        backend = OpenSoraV13Backend.build(m.pretrained, m.vae, m.text_encoder, m.prompt, m.size, m.portable_kernels,
                                           conditioning=m.conditioning, fps=config.data.fps, sampling_steps=s.steps,
                                           guidance=s.guidance, image_guidance=s.image_guidance,
                                           timesteps=config.adaptation.timesteps, device=device, dtype=dtype)
    elif m.backend == "opensora-v2.0":
        backend = OpenSoraV20Backend.build(m.pretrained, m.vae, m.text_encoder, m.clip_encoder, m.prompt, m.size,
                                           m.portable_kernels, fps=config.data.fps, conditioning=m.conditioning,
                                           sampling_steps=s.steps, guidance=s.guidance,
                                           image_guidance=s.image_guidance, timesteps=config.adaptation.timesteps,
                                           device=device, dtype=dtype)
    elif m.backend == "skyreels-v2":
        backend = SkyReelsV2Backend.from_config(config, device, dtype)
    else:
        backend = _load_ltx(config, random_weights, device, dtype)
    if m.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    return backend


def _load_ltx(config: Config, random_weights: bool, device: torch.device, dtype: torch.dtype) -> LTXVideoBackend:
    m, s = config.model, config.sampling
    if s.image_guidance != 1:
        raise ValueError("sampling.image_guidance is not implemented for model.backend=ltx-video")
    common = dict(fps=config.data.fps, sampling_steps=s.steps, schedule=s.schedule, guidance=s.guidance,
                  cond_noise_scale=s.cond_noise_scale, vae_posterior=m.vae_posterior,
                  decode_timestep=m.decode_timestep, decode_noise_scale=m.decode_noise_scale,
                  timesteps=config.adaptation.timesteps, prompt_dropout=config.adaptation.prompt_dropout,
                  device=device, dtype=dtype, compile=m.compile)
    if m.pretrained:
        if s.schedule == "linear" and s.shift != 1:
            raise ValueError("sampling.shift applies to the small default; a checkpoint's scheduler/ config sets its own")
        return LTXVideoBackend.from_pretrained(m.pretrained, m.prompt, m.negative_prompt, **common)
    weights = None if random_weights else Path(m.weights)
    if weights is not None and not weights.exists():
        raise FileNotFoundError(f"model.weights={weights} does not exist: run the pretrain stage first "
                                f"(python -m pipeline pretrain) or point model.pretrained at a checkpoint")
    return LTXVideoBackend.small(weights, m.patch_size, m.layers, m.heads, m.head_dim, shift=s.shift, **common)


def reference_deviations(config: Config, adapted: bool = False) -> list[str]:
    """Where the configured sampler (and for an adapted arm its loss) departs from the backend's
    reference, in words for arm labels (the settings themselves are params and part of every
    result's key)."""
    m, s, a = config.model, config.sampling, config.adaptation
    deviations = []
    if m.backend == "ltx-video":
        if s.schedule != "linear_quadratic":
            deviations.append(f"{s.schedule} schedule" + (f" shift {s.shift:g}" if s.shift != 1 else ""))
        if s.cond_noise_scale != 0.15:
            deviations.append("clean context" if s.cond_noise_scale == 0 else f"context re-noised x{s.cond_noise_scale:g}")
        if m.vae_posterior != "sample" and m.pretrained:
            deviations.append("posterior mode")
    if m.backend == "skyreels-v2" and s.guidance != SKYREELS_GUIDANCE:
        deviations.append(f"guidance {s.guidance:g}")
    if m.backend.startswith("opensora") and m.conditioning != "reference":
        deviations.append("clean prefix")
    if adapted and a.timesteps != "model":
        deviations.append("plain logit-normal t")
    return deviations
