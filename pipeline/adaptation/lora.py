"""LoRA adapters (PEFT) on a backend's transformer, reset to one fixed initial state per clip."""
from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model

from ..config import AdaptationConfig
from ..models.base import VideoBackend
from .base import WeightAdapter
from .optim import Optimizer, TorchAdamW


class LoraAdapter(WeightAdapter):
    """Adds one adapter once; `reset()` restores its initial weights (lora_B = 0, so the model equals
    the base model) without reloading anything or touching the frozen base weights."""

    def __init__(self, backend: VideoBackend, config: AdaptationConfig):
        self.config, self.backend = config, backend
        self.transformer = backend.transformer
        self.transformer.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)  # the same lora_A initialisation for every clip and arm
            # works on any nn.Module, diffusers or upstream Open-Sora alike
            inject_adapter_in_model(
                LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=backend.lora_targets(config.targets),
                           init_lora_weights=True),
                self.transformer,
            )
        for p in self.parameters():
            p.data = p.data.float()  # adapter weights train in fp32 even on a bf16 base
        self.initial = [p.detach().clone() for p in self.parameters()]

    @classmethod
    def describe(cls, config: AdaptationConfig) -> tuple[str, str]:
        return f"lora r{config.rank}", f"lora-r{config.rank}"

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.transformer.named_parameters() if "lora_" in n}

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_copy_(self.parameters(), self.initial)

    def optimizer(self) -> Optimizer:
        c = self.config
        return TorchAdamW(self.parameters(), c.lr, c.warmup, c.grad_accum)
