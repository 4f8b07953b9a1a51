"""Adaptation methods behind `Adapter`: LoRA adapters and full fine-tuning (weights, through the
training loop and its optimizers), noise selection and noise optimisation (the sampler's starting
noise, weights frozen).

A new method: its module (an `Adapter` subclass) and one line in METHODS; its name in
config.CHOICES (tests/test_config.py checks that the names agree).
"""
from __future__ import annotations

from ..config import AdaptationConfig
from ..models.base import VideoBackend
from .base import Adapter
from .full import FullFinetune
from .lora import LoraAdapter
from .noise import NoiseOptimisation, NoiseSelection

__all__ = ["METHODS", "Adapter", "make_adapter"]

METHODS: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,
    "full": FullFinetune,
    "select": NoiseSelection,
    "noise": NoiseOptimisation,
}


def make_adapter(backend: VideoBackend, config: AdaptationConfig) -> Adapter:
    """The adapter that `adaptation.method` names, attached to the backend's transformer."""
    return METHODS[config.method](backend, config)
