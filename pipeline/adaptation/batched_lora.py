"""LoRA for several clips at once (`adaptation.clips_per_batch`): every clip its own adapter weights
and optimizer state, trained and sampled in one batched forward.

The adapters are the `lora` method's own: PEFT injects them as for one clip (same targets, same
initial weights from `adaptation.init_seed`), then each LoRA layer is replaced by one holding a
stack of `clips` copies of its A and B. Item j of a forward batch goes through slot
`slots[(j // items_per_clip) % len(slots)]` (`route`): blocks of one clip's items, repeated as a
guided sampler repeats the batch. AdamW acts on each element alone, so one optimizer over the
stacks is every clip's own AdamW; each clip's loss is its own mean, their sum is back-propagated,
and no layer mixes items, so a clip's gradient is that of its own loss. Results equal those of one
clip at a time up to float rounding (`tests/test_adaptation.py`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

from ..config import AdaptationConfig
from ..models.base import VideoBackend
from .lora import LoraAdapter
from .optim import Optimizer, TorchAdamW


class Routing:
    """Which adapter slot each item of the next forward batches goes through."""

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.items_per_clip = 1

    def index(self, items: int, device: torch.device) -> torch.Tensor:
        if not self.slots or items % (self.items_per_clip * len(self.slots)):
            raise RuntimeError(f"a batched LoRA layer got {items} items, not blocks of {self.items_per_clip} per clip "
                               f"for the {len(self.slots)} routed clips")
        item = torch.arange(items, device=device)
        return torch.tensor(self.slots, device=device)[(item // self.items_per_clip) % len(self.slots)]


class BatchedLoraLinear(torch.nn.Module):
    """A frozen linear layer plus, per clip slot, its own LoRA update: x W^T + s (x A_c^T) B_c^T."""

    def __init__(self, layer: LoraLayer, clips: int, routing: Routing):
        super().__init__()
        self.base_layer = layer.get_base_layer()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        self.lora_A = torch.nn.Parameter(a.detach()[None].repeat(clips, 1, 1))  # (clips, r, in)
        self.lora_B = torch.nn.Parameter(b.detach()[None].repeat(clips, 1, 1))  # (clips, out, r)
        self.scaling = layer.scaling["default"]
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        slot = self.routing.index(x.shape[0], x.device)
        flat = x.to(self.lora_A.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (items, tokens, in)
        update = torch.bmm(torch.bmm(flat, self.lora_A[slot].transpose(1, 2)), self.lora_B[slot].transpose(1, 2))
        return (result + update.reshape(*x.shape[:-1], -1) * self.scaling).to(result.dtype)


class BatchedLora:
    """`clips` LoRA adapters on the backend's transformer, each reset to the `lora` method's initial state."""

    def __init__(self, backend: VideoBackend, config: AdaptationConfig, clips: int):
        single = LoraAdapter(backend, config)  # PEFT's injection and initialisation, as for one clip
        self.config, self.backend, self.clips = config, backend, clips
        self.names = list(single.named_parameters())  # PEFT's names, for each clip's saved weights
        self.routing = Routing()
        self.layers: dict[str, BatchedLoraLinear] = {}
        for name, module in list(backend.transformer.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, leaf = name.rpartition(".")
                self.layers[name] = BatchedLoraLinear(module, clips, self.routing)
                setattr(backend.transformer.get_submodule(parent) if parent else backend.transformer, leaf,
                        self.layers[name])
        self.initial = [p.detach().clone() for p in self.parameters()]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_copy_(self.parameters(), self.initial)

    def optimizer(self) -> Optimizer:
        c = self.config
        return TorchAdamW(self.parameters(), c.lr, c.warmup, c.grad_accum)

    @contextmanager
    def route(self, slots: list[int], items_per_clip: int):
        """Forwards inside go through these slots, `items_per_clip` consecutive items per clip."""
        self.routing.slots, self.routing.items_per_clip = list(slots), items_per_clip
        try:
            yield
        finally:
            self.routing.slots = []

    def state_dict(self, slot: int) -> dict[str, torch.Tensor]:
        """Clip slot's adapted weights under PEFT's parameter names, as the `lora` method saves them."""
        stacks = [p[slot] for p in self.parameters()]
        return {name: w.detach().to("cpu", copy=True) for name, w in zip(self.names, stacks, strict=True)}
