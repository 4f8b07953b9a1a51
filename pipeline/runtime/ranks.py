"""Several processes adapting to the same clip, one per GPU (`torchrun --nproc-per-node N -m pipeline
adapt ...`): each draws its own noise and the gradients are averaged, so N GPUs train on an N-times
larger batch of the one clip. Rank 0 alone samples, scores and writes to MLflow; the others follow
its list of clips."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group that torchrun describes in the environment (no-op without torchrun)."""
    if dist.is_initialized() or "MASTER_ADDR" not in os.environ:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def finish() -> None:
    """Wait for every rank, then leave the process group: a rank that exits while another still
    works can abort in the process group's teardown ("terminate called without an active exception").
    A single process keeps its group (DeepSpeed's, for full fine-tuning) for later stages."""
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast(value):
    """Rank 0's `value` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over the ranks, in one all-reduce."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size()
    for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)
