"""The interface every model family implements. Stages and the trainer only talk to this."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..runtime import ranks
from ..config import Config


def default_device() -> torch.device:
    return torch.device("cuda", ranks.local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def frames_to_tensor(frames: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) float in [-1, 1] on `device` (copied as uint8, converted there)."""
    video = torch.as_tensor(frames).to(device).permute(3, 0, 1, 2).float() / 127.5 - 1
    return video[None]


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 numpy."""
    return ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                sigma_min: float | None = None) -> torch.Tensor:
    """Rectified flow's x_t at noise level `sigma` (broadcast over x0; 0: the data, 1: pure noise),
    (1 - sigma) x0 + sigma noise. Open-Sora's trainers (`sigma_min` given, 0 for v1.3) weigh the noise
    by 1 - (1 - sigma_min)(1 - sigma) instead, which for sigma_min 0 is the same number but not always
    the same float: each backend computes it as its reference does, bit for bit."""
    keep = 1 - sigma
    if sigma_min is None:
        return keep * x0 + sigma * noise
    return keep * x0 + (1 - (1 - sigma_min) * keep) * noise


def draw_per_generator(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Item i of a batch drawn from generators[i]: (len(generators), *shape[1:]), each item what a
    batch-1 draw of that shape from its own generator gives (one sample's seed, whatever the batch)."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generators])


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


def check_context(frames: int, context: int) -> None:
    """Every backend's first rule: the context leaves at least one frame to continue."""
    if not 0 < context < frames:
        raise ValueError(f"context frames K={context} must satisfy 0 < K < T={frames}")


class PackageMissing(ImportError):
    """The backend's model code is a package that is not installed here; the message says how to get it."""


@dataclass(frozen=True)
class FrameLayout:
    """How a clip of pixel frames maps onto latent frames for one backend and clip shape."""

    frames: int  # pixel frames T
    context: int  # pixel frames K given to the model
    latent_frames: int
    latent_context: int  # clean latent frames that condition sampling
    conditioned_pixel_frames: int  # pixel frames [0, this) the clean latent prefix covers exactly


# CUDA graphs for the compiled blocks: at the presets' shapes (hundreds to a few thousand tokens) a
# block's kernels are short enough that launching them one by one leaves the GPU waiting
BLOCK_COMPILE_MODE = "reduce-overhead"


def compile_blocks(blocks: Iterable[torch.nn.Module]) -> None:
    """Regional compilation (`model.compile`): each transformer block through torch.compile with CUDA
    graphs. Blocks of one kind share one compiled graph (same code, weights as graph inputs), so the
    model costs one compilation per kind of block whatever its depth; compilation happens at a block's
    first call, and adapters put into it later are compiled in at theirs."""
    # each block kind x batch x grad mode x adapter is one compiled entry of a shared code object;
    # past dynamo's default of 8 the rest would run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile(mode=BLOCK_COMPILE_MODE, dynamic=False)


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
    can_pretrain: ClassVar[bool] = False  # the pretrain stage can train it here, from `untrained`
    takes_noise: ClassVar[bool] = False  # sample_batch takes its starting noise (the noise and select methods need it)
    batches_clips: ClassVar[bool] = False  # training_losses takes several clips (sampling.clips_per_batch's adapt stage needs it)
    compiled = False  # its transformer blocks went through `compile_blocks` (model.compile)

    @classmethod
    @abstractmethod
    def from_config(cls, config: Config) -> VideoBackend:
        """The backend as `config.model` (and the sampling and adaptation settings it reads) describes
        it, on the default device."""

    @classmethod
    def untrained(cls, config: Config) -> VideoBackend:
        """The model with random weights that the pretrain stage trains (backends that `can_pretrain`)."""
        raise NotImplementedError(f"{cls.__name__} is not pretrained here (can_pretrain is False)")

    @classmethod
    def reference_deviations(cls, config: Config) -> list[str]:
        """Where the configured sampler and loss depart from the model's reference, in words for arm labels."""
        return []

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

    def training_losses(self, latents: Sequence[torch.Tensor], clean_frames: Sequence[int],
                        generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Each clip's `training_loss` in one forward (backends that `batches_clips`)."""
        raise NotImplementedError(f"{type(self).__name__} trains one clip at a time")

    @abstractmethod
    def sample(self, context: torch.Tensor, latent_frames: int, seed: int) -> torch.Tensor:
        """Continue the context's encoding to `latent_frames` latent frames, as the model's reference
        pipeline does with its generator seeded by `seed`."""

    def sample_batch(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int],
                     noise: torch.Tensor | None = None, steps: int | None = None, grad: bool = False) -> torch.Tensor:
        """Continuation i of context i (a batch of encodings) from seeds[i], equal to one `sample` call
        per context and seed up to float rounding. Backends with a batched sampler draw them in one
        batch, each from its own generator (`_sample_batch`).

        Backends that `takes_noise` also take `noise` ((B, C, latent_frames, h, w), what `draw_noise`
        draws; frames under the context are not read) in place of each seed's own starting noise,
        `steps` in place of the configured sampler steps, and `grad` to back-propagate into `noise`."""
        if len(contexts) != len(seeds):
            raise ValueError(f"{len(contexts)} contexts and {len(seeds)} seeds: one seed per context")
        if (noise is not None or steps is not None or grad) and not self.takes_noise:
            raise NotImplementedError(f"{type(self).__name__} samples from its seeds' own noise only")
        with torch.set_grad_enabled(grad):
            return self._sample_batch(contexts, latent_frames, seeds, noise, steps)

    def _sample_batch(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int],
                      noise: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        """`sample_batch` after its checks; this default makes one `sample` call per context and seed."""
        return torch.cat([self.sample(context[None], latent_frames, seed) for context, seed in zip(contexts, seeds)])

    def draw_noise(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int]) -> torch.Tensor:
        """The starting noise `sample_batch` draws from each seed (backends that `takes_noise`)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its sampling noise")

    def begin_forward(self) -> None:
        """Called before each transformer forward: with compiled blocks each forward is a new
        CUDA-graph step, so that the previous one's outputs may be overwritten."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass: less memory, about 1/3 more compute."""

    def lora_targets(self, preset: str) -> list[str]:
        """Module names (PEFT target_modules) for a target preset: 'attention' or 'attention+mlp'."""
        presets = {"attention": self.attention_targets, "attention+mlp": self.attention_targets + self.mlp_targets}
        if preset not in presets:
            raise ValueError(f"adaptation.targets={preset!r} is not one of {sorted(presets)}")
        return presets[preset]
