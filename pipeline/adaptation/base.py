"""The interface every adaptation method implements; the stages and the trainer only talk to this."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..config import AdaptationConfig
from .optim import Optimizer


class Adapter(ABC):
    """A method, built as `Method(backend, adaptation_config)` and attached once to the backend's
    transformer: what trains, the reset to the state every clip starts from (the base model), and the
    method's name in the arm's label and run name."""

    @classmethod
    @abstractmethod
    def label(cls, config: AdaptationConfig) -> str:
        """The method and its settings in words, as arm labels show it (`lora r16`)."""

    @classmethod
    @abstractmethod
    def run_name(cls, config: AdaptationConfig) -> str:
        """The method and its settings in a stage run's name (`lora-r16`)."""

    @abstractmethod
    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The weights that train, by parameter name."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the base model, without reloading anything."""

    @abstractmethod
    def optimizer(self) -> Optimizer:
        """A fresh optimizer for one clip; the adapter frees it at its next reset."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_parameters().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights by parameter name, copied (they are written after the next clip has
        started changing them)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.named_parameters().items()}
