"""The interface every model family implements. Stages and the trainer only talk to this."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape and sum, and a strided sample of its values: results
    are keyed on the weights actually loaded, not on a path."""
    parts = []
    with torch.no_grad():
        for name, p in module.state_dict().items():
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 64)].double().cpu().tolist()
            parts.append([name, list(p.shape), flat.double().sum().item(), sample])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FrameLayout:
    """How a clip of pixel frames maps onto latent frames for one backend and clip shape."""

    frames: int  # pixel frames T
    context: int  # pixel frames K given to the model
    latent_frames: int
    latent_context: int  # clean latent frames that condition sampling
    conditioned_pixel_frames: int  # pixel frames [0, this) the clean latent prefix covers exactly


class VideoBackend(ABC):
    """A video diffusion model that continues a clip from a clean prefix of latent frames.

    Videos are float tensors (B, 3, T, H, W) in [-1, 1]; latents are (B, C, F, h, w).
    `transformer` is the module that adaptation methods train.
    """

    transformer: torch.nn.Module
    vae: torch.nn.Module | None = None  # the latent encoder/decoder; None when the model works on pixels
    device: torch.device
    dtype: torch.dtype
    attention_targets: list[str]  # module-name suffixes LoRA adapts in the 'attention' preset
    mlp_targets: list[str]  # added by 'attention+mlp'

    @abstractmethod
    def frame_layout(self, frames: int, context: int, height: int, width: int) -> FrameLayout:
        """Check the clip shape against the model's rules (ValueError naming the rule) and map it."""

    @abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """The video's encoding, deterministic (what the latent cache keeps): latents, or the
        parameters of a VAE posterior that `latents_from` draws from."""

    def latents_from(self, encoding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents from an encoding; backends whose reference samples the VAE posterior draw here."""
        return encoding

    @abstractmethod
    def decode(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def training_loss(self, latents: torch.Tensor, clean_frames: int, generator: torch.Generator) -> torch.Tensor:
        """Rectified-flow loss on an encoding, the first `clean_frames` latent frames kept clean (timestep 0)."""

    @abstractmethod
    def sample(self, context: torch.Tensor, latent_frames: int, seed: int) -> torch.Tensor:
        """Continue the context's encoding to `latent_frames` latent frames, as the model's reference
        pipeline does with its generator seeded by `seed`."""

    def sample_batch(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int]) -> torch.Tensor:
        """Continuation i of context i (a batch of encodings) from seeds[i]. Backends with a batched
        sampler draw them in one batch, each from its own generator, equal to one `sample` call per
        context and seed up to float rounding; this default makes those calls."""
        return torch.cat([self.sample(context[None], latent_frames, seed)
                          for context, seed in zip(contexts, seeds, strict=True)])

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass: less memory, about 1/3 more compute."""

    def lora_targets(self, preset: str) -> list[str]:
        """Module names (PEFT target_modules) for a target preset: 'attention' or 'attention+mlp'."""
        presets = {"attention": self.attention_targets, "attention+mlp": self.attention_targets + self.mlp_targets}
        if preset not in presets:
            raise ValueError(f"adaptation.targets={preset!r} is not one of {sorted(presets)}")
        return presets[preset]
