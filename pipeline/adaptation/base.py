"""The interface every adaptation method implements; the stages only talk to this."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence

import torch

from ..config import AdaptationConfig
from .optim import Optimizer
from .trainer import Visit, adapt_to_clip


class Adapter(ABC):
    """A method, built as `Method(backend, adaptation_config)` once per stage: how it fits one clip,
    the reset to the state every clip starts from (the base model), and its names."""

    @classmethod
    @abstractmethod
    def names(cls, config: AdaptationConfig) -> tuple[str, str]:
        """The method and its settings in words, as arm labels show it, and as a stage run's name:
        ('lora r16 20 steps', 'lora-r16-lr0.001-20steps')."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the base model, without reloading anything."""

    @abstractmethod
    def fit(self, window: torch.Tensor, seed: int, latent_frames: int, sample_seeds: Sequence[int],
            at: Collection[int] = (), visit: Visit | None = None) -> dict[str, float]:
        """Fit to one clip's encoding `window` (its context, the whole clip or another clip's
        context), drawing from `seed`, before the clip's samples (from `sample_seeds`, continued to
        `latent_frames`) are drawn. Returns the clip's adaptation figures.

        After each step count in `at` (adaptation.eval_at), `visit(steps, figures so far)` runs with
        the method in the state a fit of that many steps ends in, its figures those such a fit returns
        (the seconds spent in visits left out), and the fit then goes on unchanged."""

    def sampling_noise(self) -> torch.Tensor | None:
        """The starting noise of the clip's samples after `fit`; None: each sample seed's own."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights by parameter name (none for methods that train no weights)."""
        return {}


class WeightAdapter(Adapter):
    """A method that trains weights of the transformer on the clip (the trainer's loop, for
    `adaptation.steps` steps at `adaptation.lr`)."""

    @classmethod
    @abstractmethod
    def describe(cls, config: AdaptationConfig) -> tuple[str, str]:
        """What trains, in words and as a name: ('lora r16', 'lora-r16')."""

    @classmethod
    def names(cls, config: AdaptationConfig) -> tuple[str, str]:
        words, name = cls.describe(config)
        return f"{words} {config.steps} steps", f"{name}-lr{config.lr:g}-{config.steps}steps"

    @abstractmethod
    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The weights that train, by parameter name."""

    @abstractmethod
    def optimizer(self) -> Optimizer:
        """A fresh optimizer for one clip; the adapter frees it at its next reset."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_parameters().values())

    def fit(self, window: torch.Tensor, seed: int, latent_frames: int, sample_seeds: Sequence[int],
            at: Collection[int] = (), visit: Visit | None = None) -> dict[str, float]:
        return adapt_to_clip(self.backend, self, window, self.config, seed, at, visit)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copied: they are written after the next clip has started changing them."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.named_parameters().items()}
