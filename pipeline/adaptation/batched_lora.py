"""LoRA for several clips at once (`sampling.clips_per_batch`): every clip its own adapter weights
and optimizer state, trained and sampled in one batched forward.

The adapters are the `lora` method's own: PEFT injects them as for one clip (same targets, same
initial weights from `adaptation.init_seed`), then each LoRA layer is replaced by one holding a
stack of `clips` copies of its A and B. The items of a forward batch come in blocks of
`items_per_clip`, one per routed slot (`route`), the blocks repeated as a
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


class Routing:
    """Which adapter slots the next forwards go through: `slots`, one block of `items_per_clip`
    consecutive items each, the blocks repeated as a guided sampler repeats the batch. The slots'
    index lives in one device tensor for every route, written in place when the route is set
    (outside any compiled region): compiled blocks read it as a static input of their CUDA graphs,
    so a new tensor per route would re-record every graph (measured: 511 ms a step of 4 clips
    instead of about 100), and one built inside a compiled block would be a graph output,
    overwritten by the next replay."""

    def __init__(self, clips: int, device: torch.device) -> None:
        self._index = torch.zeros(clips, dtype=torch.long, device=device)
        self.set([], 1)

    def set(self, slots: list[int], items_per_clip: int) -> None:
        if len(slots) > len(self._index):
            raise ValueError(f"{len(slots)} clips routed through adapters for {len(self._index)}")
        self._index[:len(slots)].copy_(torch.tensor(slots, dtype=torch.long))
        self.slots, self.items_per_clip = list(slots), items_per_clip

    @property
    def index(self) -> torch.Tensor:
        return self._index[:len(self.slots)]

    def repeats(self, items: int) -> int:
        """How many times the routed blocks repeat in a batch of `items`."""
        block = self.items_per_clip * len(self.slots)
        if not self.slots or items % block:
            raise RuntimeError(f"a batched LoRA layer got {items} items, not blocks of {self.items_per_clip} "
                               f"per clip for the {len(self.slots)} routed clips")
        return items // block


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
        r = self.routing
        # (repeats, slots, items per clip, tokens, in): each routed clip's block against its own A and B,
        # selected once per slot (index_select: its backward adds into the selected rows)
        blocks = x.to(self.lora_A.dtype).reshape(r.repeats(x.shape[0]), len(r.slots), r.items_per_clip, -1, x.shape[-1])
        a, b = self.lora_A.index_select(0, r.index), self.lora_B.index_select(0, r.index)
        update = torch.einsum("ncktr,cor->nckto", torch.einsum("nckti,cri->ncktr", blocks, a), b)
        return (result + update.reshape(*x.shape[:-1], -1) * self.scaling).to(result.dtype)


class BatchedLora(LoraAdapter):
    """`clips` LoRA adapters on the backend's transformer, each reset to the `lora` method's initial
    state; its clips are fitted together by `trainer.adapt_clips_together`, inside `route`."""

    def __init__(self, backend: VideoBackend, config: AdaptationConfig, clips: int):
        super().__init__(backend, config)  # PEFT's injection and initialisation, as for one clip
        self.clips, self.routing = clips, Routing(clips, backend.device)
        self.peft_names = list(self.named_parameters())  # for each clip's saved weights
        for name, module in list(self.transformer.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, leaf = name.rpartition(".")
                setattr(self.transformer.get_submodule(parent), leaf, BatchedLoraLinear(module, clips, self.routing))
        self.initial = [p.detach().clone() for p in self.parameters()]

    def fit(self, *args, **kwargs):
        raise NotImplementedError("batched adapters fit several clips at once: trainer.adapt_clips_together")

    @contextmanager
    def route(self, slots: list[int], items_per_clip: int):
        """Forwards inside go through these slots, `items_per_clip` consecutive items per clip; the
        routing outside (sampling at an eval_at point within training's) holds again afterwards."""
        outer = self.routing.slots, self.routing.items_per_clip
        self.routing.set(slots, items_per_clip)
        try:
            yield
        finally:
            self.routing.set(*outer)

    def clip_state_dict(self, slot: int) -> dict[str, torch.Tensor]:
        """Clip slot's adapted weights under PEFT's parameter names, as the `lora` method saves them."""
        return {name: p[slot].detach().to("cpu", copy=True)
                for name, p in zip(self.peft_names, self.parameters(), strict=True)}
