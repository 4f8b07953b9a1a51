"""Optimizers behind one small interface, so the training loop does not care which one runs:
`micro_step(loss)` once per micro-batch, `step()` once per optimizer step (after `accum` micro-steps)."""
from __future__ import annotations

import math
import os
import socket

import torch

from ..runtime import ranks


def linear_warmup(optimizer: torch.optim.Optimizer, warmup: int, decay_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * (step + 1) / warmup for the first `warmup` steps, then lr: the first step already moves.
    With `decay_steps`, a cosine from lr down to lr / 10 at step `decay_steps` after the warmup."""
    def factor(step: int) -> float:
        if step < warmup or not decay_steps:
            return min(1.0, (step + 1) / max(1, warmup))
        progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Optimizer:
    accum: int = 1

    def micro_step(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free optimizer state (the adapter calls it at its next reset)."""


class TorchAdamW(Optimizer):
    """AdamW with linear warmup, gradients averaged over `accum` micro-batches. Weights stored below
    fp32 (a bf16 model fully fine-tuned) train through fp32 master copies, as DeepSpeed's bf16 mode
    does: most of an lr 1e-5 update is below bf16's resolution and would round away."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, warmup: int, accum: int = 1, decay_steps: int = 0):
        self.params = params
        self.masters = [p.detach().float() if p.dtype in (torch.bfloat16, torch.float16) else p for p in params]
        self.low = [(p, m) for p, m in zip(params, self.masters) if m is not p]
        fused = all(p.is_cuda for p in params)  # one kernel for all parameters on a GPU
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=0.0, fused=fused or None)
        self.schedule = linear_warmup(self.optimizer, warmup, decay_steps)
        self.accum = accum

    def micro_step(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        ranks.average_gradients(self.params)
        self._gradients_to_masters()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.low:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in self.low], [m for _, m in self.low])

    @torch.no_grad()
    def _gradients_to_masters(self) -> None:
        """The low-precision gradients as the masters' fp32 gradients, in one multi-tensor copy (a
        conversion per parameter was ~1,000 kernels a step for Open-Sora v1.3); freed again by
        `zero_grad`, so they take no memory during the forward and backward. A weight without a
        gradient this step leaves its master's None, so AdamW skips it."""
        with_grad = [(p, master) for p, master in self.low if p.grad is not None]
        for p, master in with_grad:
            master.grad = torch.empty_like(master)
        if with_grad:
            torch._foreach_copy_([master.grad for _, master in with_grad], [p.grad for p, _ in with_grad])
        for p, _ in self.low:
            p.grad = None

    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs: AdamW's state, the schedule's, and the fp32 masters of the weights
        stored below fp32 (none for an fp32 model)."""
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "masters": [m for _, m in self.low]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        """After the weights were loaded: without saved masters they come from those weights (the
        masters made at construction would overwrite them at the next step)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        saved = state.get("masters")
        for i, (p, master) in enumerate(self.low):
            master.copy_(saved[i] if saved else p)

    def close(self) -> None:
        self.masters = self.low = []
        self.optimizer = self.schedule = None  # the schedule holds the optimizer, and so its state


class DeepSpeedAdamW(Optimizer):
    """AdamW through a DeepSpeed engine: ZeRO stage 0-2, optional optimizer offload to the CPU, in the
    module's own dtype (bf16 weights get fp32 master weights; fp32 weights stay fp32, so the adapted
    arm samples with weights of the same precision as the baseline). A new engine per clip starts
    from fresh optimizer state and masters."""

    def __init__(self, module: torch.nn.Module, lr: float, warmup: int, accum: int, zero_stage: int, offload: bool,
                 micro_batch: int):
        import deepspeed

        ranks.init()  # torchrun's process group; DeepSpeed averages the ranks' gradients itself
        if not torch.distributed.is_initialized():  # a single process started without a launcher
            for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
                os.environ.setdefault(key, value)
            torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                                 world_size=1)
        config = deepspeed_config(module, lr, accum, zero_stage, offload, micro_batch)
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config,
                                               lr_scheduler=lambda optimizer: linear_warmup(optimizer, warmup))
        self.accum = accum

    def micro_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # the engine divides by the accumulation steps itself
        self.engine.step()  # steps the optimizer only at accumulation boundaries

    def step(self) -> None:
        pass

    def close(self) -> None:
        self.engine.destroy()
        del self.engine
        torch.cuda.empty_cache()


def deepspeed_config(module: torch.nn.Module, lr: float, accum: int, zero_stage: int, offload: bool,
                     micro_batch: int) -> dict:
    """The engine's settings. bf16 only for a bf16 module: on an fp32 module DeepSpeed would cast the
    live weights to bf16 in place, and the adapted arm would sample with rounded weights."""
    zero = {"stage": zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "bf16": {"enabled": next(module.parameters()).dtype == torch.bfloat16},
        "zero_optimization": zero,
        # torch's AdamW on DeepSpeed's fp32 partitions: no CUDA extension to compile on the cluster
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 2**31,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
