"""Full fine-tuning: every transformer weight trains; the base weights come back from an in-memory
copy between clips (no checkpoint written, nothing reloaded from disk)."""
from __future__ import annotations

import torch

from ..config import AdaptationConfig
from ..models.base import VideoBackend
from .base import WeightAdapter
from .optim import DeepSpeedAdamW, Optimizer, TorchAdamW


class FullFinetune(WeightAdapter):
    def __init__(self, backend: VideoBackend, config: AdaptationConfig):
        if config.zero_stage not in (0, 1, 2):
            raise ValueError(f"adaptation.zero_stage={config.zero_stage}: stages 0-2 keep whole weights on each GPU, "
                             "which the in-memory reset needs; stage 3 is not supported")
        self.config, self.backend = config, backend
        self.transformer = backend.transformer
        self.base = [p.detach().clone() for p in self.parameters()]
        self.current: Optimizer | None = None  # kept until the next reset: the adapted weights live in it

    @classmethod
    def describe(cls, config: AdaptationConfig) -> tuple[str, str]:
        return "full fine-tuning", "full"

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.transformer.named_parameters())

    @torch.no_grad()
    def reset(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
        torch._foreach_copy_(self.parameters(), self.base)

    def optimizer(self) -> Optimizer:
        """DeepSpeed on a GPU (adaptation.deepspeed), else plain AdamW."""
        c = self.config
        self.transformer.requires_grad_(True)
        if c.deepspeed and self.backend.device.type == "cuda":
            self.current = DeepSpeedAdamW(self.transformer, c.lr, c.warmup, c.grad_accum, c.zero_stage, c.offload,
                                          c.batch_size)
        else:
            self.current = TorchAdamW(self.parameters(), c.lr, c.warmup, c.grad_accum)
        return self.current
