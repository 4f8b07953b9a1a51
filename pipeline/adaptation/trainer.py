"""The training loop shared by pretraining and test-time adaptation, and the TTA objectives."""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import torch

from ..runtime import ranks
from ..config import AdaptationConfig
from ..models.base import VideoBackend
from .optim import Optimizer

if TYPE_CHECKING:
    from .base import WeightAdapter
    from .batched_lora import BatchedLora


class NonFiniteLoss(RuntimeError):
    pass


Visit = Callable[[int, dict[str, float]], None]  # (steps taken, the adaptation's figures up to them)
GroupVisit = Callable[[int, list["dict[str, float] | NonFiniteLoss"]], None]  # the same, per clip of a group


def train(optimizer: Optimizer, loss_fn: Callable[[int], torch.Tensor], steps: int,
          on_step: Callable[[int, float], None] | None = None, log_every: int = 10, start: int = 0,
          pause_at: Collection[int] = (), on_pause: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Optimizer steps `start` to `steps` of `optimizer.accum` micro-batches each; `loss_fn(step)`
    returns the loss of one micro-batch. Returns the mean loss of each step. After each step count in
    `pause_at`, `on_pause(steps taken, losses so far)` runs with the weights in that state.

    Losses are read back from the device only at logging intervals, pauses and the end (no per-step
    sync); a NaN or infinite loss stops training with NonFiniteLoss naming the step range."""
    pending: list[torch.Tensor] = []
    losses: list[float] = []
    for step in range(start, steps):
        micro = []
        for _ in range(optimizer.accum):
            loss = loss_fn(step)  # one clip's, or several clips' (each with its own adapter: their sum trains each)
            optimizer.micro_step(loss.sum())
            micro.append(loss.detach())
        optimizer.step()
        pending.append(torch.stack(micro).mean(0))
        paused = step + 1 in pause_at and on_pause is not None
        if (step + 1) % log_every == 0 or step + 1 == steps or paused:
            values = torch.stack(pending).tolist()
            pending.clear()
            if not all(_any_finite(v) for v in values):
                raise NonFiniteLoss(f"loss became {values[-1]} within steps {step + 2 - len(values)}-{step + 1}")
            losses.extend(values)
            if on_step is not None:
                on_step(step + 1, values[-1])
        if paused:
            on_pause(step + 1, losses)
    return losses


def adapt_to_clip(backend: VideoBackend, adapter: WeightAdapter, latents: torch.Tensor, config: AdaptationConfig,
                  seed: int, at: Collection[int] = (), visit: Visit | None = None) -> dict[str, float]:
    """Fit the adapter on one clip's latents (the context window or the whole clip, as given); after
    each step count in `at`, `visit` sees the model in that state (see Adapter.fit).

    Objective `continuation`: a random number of leading latent frames stays clean, the rest is
    noised, as at sampling time. `v2v_head`: the first half of the latent frames stays clean (the
    Open-Sora v1.3 training mask). `denoising`: every frame is noised."""
    frames = _check_frames(config, latents)
    seed += 1000 * ranks.rank()  # each rank of a multi-GPU run draws its own noise for the same clip
    generator = torch.Generator(backend.device).manual_seed(seed)
    rng = random.Random(seed)  # host-side draws: no device sync per step
    batch = latents.expand(config.batch_size, -1, -1, -1, -1)

    def loss_fn(step: int) -> torch.Tensor:
        return backend.training_loss(batch, _clean_frames(config.objective, frames, rng), generator)

    losses, seconds = _train_visiting(backend, adapter.optimizer(), loss_fn, config.steps, at, visit, _figures)
    return _figures(config.steps, seconds, losses)


def _train_visiting(backend: VideoBackend, optimizer: Optimizer, loss_fn: Callable[[int], torch.Tensor], steps: int,
                    at: Collection[int], visit: Callable[[int, object], None] | None,
                    figures: Callable[[int, float, list], object]) -> tuple[list, float]:
    """`train` with the transformer in training mode, visited after each step count in `at` (0 before
    the first step) with `figures(steps, seconds, losses)` so far and the transformer in eval mode.
    Returns the losses and the training's seconds, the visits' left out."""
    visited = 0.0

    def pause(steps_taken: int, losses: list) -> None:
        nonlocal visited
        synchronize(backend.device)
        paused = time.perf_counter()
        backend.transformer.eval()
        visit(steps_taken, figures(steps_taken, paused - start - visited, losses))
        backend.transformer.train()
        visited += time.perf_counter() - paused

    backend.transformer.train()
    start = time.perf_counter()
    if 0 in at and visit is not None:
        pause(0, [])
    losses = train(optimizer, loss_fn, steps, pause_at=at,
                   on_pause=pause if visit is not None else None) if steps else []
    synchronize(backend.device)
    seconds = time.perf_counter() - start - visited
    backend.transformer.eval()
    return losses, seconds


def adapt_clips_together(backend: VideoBackend, adapter: BatchedLora, windows: Sequence[torch.Tensor],
                         config: AdaptationConfig, seeds: Sequence[int], at: Collection[int] = (),
                         visit: GroupVisit | None = None) -> list[dict[str, float] | NonFiniteLoss]:
    """`adapt_to_clip` for several clips at once (sampling.clips_per_batch), clip i in adapter slot
    i with the draws adapt_to_clip makes for it from seeds[i], in one batched forward and backward
    per step. Per clip: its figures (its `adapt_seconds` the group's time over the clips), or the
    NonFiniteLoss of a clip whose loss became NaN or infinite (the others are not affected by it).
    After each step count in `at`, `visit(steps, per clip figures so far)` sees the adapters in that
    state (see Adapter.fit), inside the adapter's routing of the group."""
    frames = _check_frames(config, windows[0])
    generators = [torch.Generator(backend.device).manual_seed(seed) for seed in seeds]
    rngs = [random.Random(seed) for seed in seeds]
    batches = [w.expand(config.batch_size, -1, -1, -1, -1) for w in windows]

    def loss_fn(step: int) -> torch.Tensor:
        return backend.training_losses(batches, [_clean_frames(config.objective, frames, rng) for rng in rngs],
                                       generators)

    def figures(steps: int, seconds: float, losses: list[list[float]]) -> list[dict[str, float] | NonFiniteLoss]:
        return _clip_figures(steps, seconds, losses, len(windows))

    with adapter.route(list(range(len(windows))), config.batch_size):
        losses, seconds = _train_visiting(backend, adapter.optimizer(), loss_fn, config.steps, at, visit, figures)
    return figures(config.steps, seconds, losses)


def _clip_figures(steps: int, seconds: float, losses: list[list[float]], clips: int
                  ) -> list[dict[str, float] | NonFiniteLoss]:
    """Per clip of a group adapted together: its figures after `steps` steps (the group's `seconds`
    shared out), or the NonFiniteLoss its loss became."""
    results = []
    for i in range(clips):
        clip = [step[i] for step in losses]
        bad = next((step for step, value in enumerate(clip) if not math.isfinite(value)), None)
        results.append(_figures(steps, seconds / clips, clip) | {"adapt_group_seconds": seconds}
                       if bad is None else NonFiniteLoss(f"loss became {clip[bad]} at step {bad + 1}"))
    return results


def _check_frames(config: AdaptationConfig, latents: torch.Tensor) -> int:
    frames = latents.shape[2]
    if config.objective in ("continuation", "v2v_head") and frames < 2:
        raise ValueError("the continuation objective needs at least 2 latent frames to train on; "
                         "use adaptation.objective=denoising or more context frames")
    return frames


def _clean_frames(objective: str, frames: int, rng: random.Random) -> int:
    """The latent frames kept clean in one training step (see adapt_to_clip)."""
    if objective == "continuation":
        return rng.randint(1, frames - 1)
    return frames // 2 if objective == "v2v_head" else 0


def _any_finite(value: float | list[float]) -> bool:
    """A step's loss: one clip's, or several clips' (training goes on while any of them is finite)."""
    return math.isfinite(value) if isinstance(value, float) else any(math.isfinite(v) for v in value)


def _figures(steps: int, seconds: float, losses: list[float]) -> dict[str, float]:
    return {
        "adapt_seconds": seconds,
        "adapt_steps_per_second": steps / seconds if steps else 0.0,
        "adapt_loss_first": losses[0] if losses else math.nan,
        "adapt_loss_last": losses[-1] if losses else math.nan,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
