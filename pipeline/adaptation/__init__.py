"""Adaptation methods: LoRA adapters and full fine-tuning, the optimizers and the training loop."""
from __future__ import annotations

from ..config import AdaptationConfig
from ..models.base import VideoBackend
from .full import FullFinetune
from .lora import LoraAdapter


def make_adapter(backend: VideoBackend, config: AdaptationConfig) -> LoraAdapter | FullFinetune:
    """The adapter that `adaptation.method` names, attached to the backend's transformer."""
    return {"lora": LoraAdapter, "full": FullFinetune}[config.method](backend, config)
