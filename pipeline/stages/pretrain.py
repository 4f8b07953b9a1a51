"""Pretrain the small default model on the train split so that it can continue clips at all.

Rectified-flow training with a random clean prefix (and sometimes none), the same objective the
backend uses at test time, AdamW with warmup and a cosine decay; with `pretrain.ema`
the weights written are an exponential moving average of the trained ones. The result is a safetensors
file that records the digest of what made it (settings, and the training clips: the synthetic generator's
version, or a folder's clip hashes); a rerun with the same digest skips. Weights are never overwritten
(results refer to them): a new digest writes `<name>.<digest>.safetensors` beside `model.weights`, and
later stages of the same `experiment` command use that file. A killed run resumes from its last
checkpoint (`<weights>.resume`, every two minutes) with the same batches and noise.

Synthetic train clips are rendered here, in memory (preprocess writes only the test split of the
synthetic source); other sources read the train split of the manifest.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adaptation.optim import TorchAdamW
from ..adaptation.trainer import train
from ..config import Config
from ..data import synthetic
from ..data.manifest import read_manifest, resolve_clip_path, select_clips
from ..models import BACKENDS, load_backend
from ..models.base import frames_to_tensor
from ..runtime.progress import Progress

# what the weights depend on: the training clips, the architecture and the training settings (the
# loss is the backend's adaptation loss, with its noise-level draw)
# (not the output path, nor data settings that only later stages read)
INPUTS = ("data.source", "data.input_dir", "data.splits_dir", "data.split_id", "data.sample", "data.start_frame",
          "data.test_fraction", "data.frames", "data.height", "data.width", "data.fps", "data.train_clips",
          "data.seed", "model.backend", "model.pretrained", "model.patch_size", "model.layers", "model.heads",
          "model.head_dim", "model.prompt", "model.dtype", "adaptation.timesteps", "pretrain")
CHECKPOINT_SECONDS = 120


def weights_digest(config: Config) -> str:
    """The settings' digest and what identifies the training clips' content."""
    if config.data.source == "synthetic":
        clips = f"synthetic generator {synthetic.GENERATOR_VERSION}"
    else:
        clips = ",".join(r.content_hash for r in select_clips(read_manifest(config.data.manifest), "train", 0))
    settings = config.digest(*INPUTS, exclude=("model.weights",))
    return hashlib.sha256(f"{settings} {clips}".encode()).hexdigest()[:16]


def weights_path(config: Config) -> Path:
    """Where the weights for this config live: `model.weights` when it is free or holds exactly these
    settings' weights, else a file named by the digest beside it."""
    weights = Path(config.model.ltx_video.weights)
    if not weights.exists() or _digest_of(weights) == weights_digest(config):
        return weights
    return weights.with_name(f"{weights.stem}.{weights_digest(config)}{weights.suffix}")


def pretrain(config: Config) -> Path:
    """The pretrain stage: train (or find) the small default's weights, tracked as an MLflow run."""
    import mlflow

    from ..tracking.runs import stage_run

    if not BACKENDS[config.model.backend].can_pretrain:
        raise ValueError(f"pretrain trains the small default model; model.backend={config.model.backend} is not "
                         "pretrained here: point model.pretrained at its checkpoint")
    if config.model.pretrained:
        raise ValueError("pretrain trains the small default model; model.pretrained is set, so there is nothing to do")
    weights = weights_path(config)
    digest = weights_digest(config)
    if weights.exists() and _digest_of(weights) == digest:
        print(f"[pretrain] {weights} is up to date (digest {digest}); skipping", flush=True)
        return weights
    if weights != Path(config.model.ltx_video.weights):
        print(f"[pretrain] {config.model.ltx_video.weights} holds weights of other settings; writing {weights} "
              f"beside it (use it with --set model.weights={weights})", flush=True)
    with stage_run(config, "pretrain", digest):
        train_weights(config, weights, training_clips(config),
                      lambda step, loss: mlflow.log_metric("train_loss", loss, step=step))
        mlflow.log_metric("weights_mb", weights.stat().st_size / 2**20)
    return weights


def train_weights(config: Config, weights: Path, clips: torch.Tensor, log=None) -> Path:
    """Train the small default on `clips` ((N, T, H, W, 3) uint8) and write `weights`, resuming from
    `<weights>.resume` when a run with the same digest was cut off. No MLflow: the GPU machines run it
    directly (`log(step, loss)` is called every 25 steps)."""
    p, digest = config.pretrain, weights_digest(config)
    if len(clips) < p.batch_size:
        raise ValueError(f"{len(clips)} training clips, fewer than pretrain.batch_size={p.batch_size}")
    torch.manual_seed(p.seed)
    backend = load_backend(config, random_weights=True)
    clips = clips.to(backend.device)
    rng = random.Random(p.seed)
    generator = torch.Generator(backend.device).manual_seed(p.seed)
    model = backend.transformer
    model.requires_grad_(True).train()
    optimizer = TorchAdamW(list(model.parameters()), p.lr, p.warmup, decay_steps=p.steps)
    # the moving average starts at the initial weights, whose share has decayed to nothing by the end
    average = {name: w.detach().clone() for name, w in model.named_parameters()} if p.ema > 0 else None
    resume = weights.with_name(weights.name + ".resume")
    start = _restore(resume, digest, model, optimizer, rng, generator, average)
    progress = Progress("pretrain", p.steps, done=start, every_seconds=10)
    saved = time.monotonic()

    def loss_fn(step: int) -> torch.Tensor:
        if average is not None and step > 0:  # the weights that optimizer step `step - 1` made
            _update_average(average, model, p.ema)
        batch = torch.cat([frames_to_tensor(clips[i], backend.device) for i in rng.sample(range(len(clips)), p.batch_size)])
        clean = 0 if rng.random() < p.unconditional_prob else rng.randint(1, batch.shape[2] - 1)
        return backend.training_loss(batch, clean, generator)

    def on_step(step: int, loss: float) -> None:
        nonlocal saved
        progress.update(step, f"step {step}", f"loss {loss:.4f}")
        if log is not None:
            log(step, loss)
        if time.monotonic() - saved > CHECKPOINT_SECONDS and step < p.steps:
            _checkpoint(resume, digest, step, model, optimizer, rng, generator, average)
            saved = time.monotonic()

    # on_step(s) runs after s steps: a checkpoint taken there resumes at step index s
    # TF32 matmuls on a GPU for training only: the stages that follow in this process sample in full fp32
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = backend.device.type == "cuda"
    try:
        train(optimizer, loss_fn, p.steps, on_step, log_every=25, start=start)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    state = model.state_dict()
    if average is not None:
        _update_average(average, model, p.ema)
        state.update(average)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    partial = weights.with_name(weights.name + ".partial")
    save_file(state, str(partial), metadata={"digest": digest})
    partial.replace(weights)
    resume.unlink(missing_ok=True)
    return weights


def training_clips(config: Config) -> torch.Tensor:
    """The train split as (N, T, H, W, 3) uint8: synthetic clips rendered in parallel (each from its own
    seed, so the worker count changes nothing), or the manifest's train clips."""
    d = config.data
    if d.source == "synthetic":
        progress = Progress("pretrain: rendering train clips", d.train_clips)
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            clips = []
            jobs = [(d, i) for i in range(d.train_clips)]
            for i, clip in enumerate(pool.map(_render_train_clip, jobs, chunksize=16)):
                clips.append(clip)
                progress.update(i + 1, "")
        return torch.from_numpy(np.stack(clips))
    from ..data.video_io import read_video

    records = select_clips(read_manifest(d.manifest), "train", 0)
    return torch.from_numpy(np.stack([read_video(resolve_clip_path(d.manifest, r), d.frames)[0][: d.frames]
                                      for r in records]))


def _render_train_clip(args) -> np.ndarray:
    return synthetic.synthetic_clip(*args, split="train")[2]


def _checkpoint(path: Path, digest: str, step: int, model: torch.nn.Module, optimizer: TorchAdamW,
                rng: random.Random, generator: torch.Generator, average: dict[str, torch.Tensor] | None) -> None:
    state = {"digest": digest, "step": step, "model": model.state_dict(), **optimizer.state_dict(),
             "rng": rng.getstate(), "generator": generator.get_state(), "average": average}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def _restore(path: Path, digest: str, model: torch.nn.Module, optimizer: TorchAdamW, rng: random.Random,
             generator: torch.Generator, average: dict[str, torch.Tensor] | None) -> int:
    """The step to start from: that of the checkpoint at `path` when it has the same digest, else 0."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=False)
    if state["digest"] != digest:
        print(f"[pretrain] {path} is of other settings; starting from step 0", flush=True)
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state)
    rng.setstate(state["rng"])
    generator.set_state(state["generator"].cpu())
    if average is not None:
        for name, value in state["average"].items():
            average[name].copy_(value)
    print(f"[pretrain] resuming {path} at step {state['step']}", flush=True)
    return state["step"]


@torch.no_grad()
def _update_average(average: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for name, w in model.named_parameters():
        average[name].lerp_(w, 1 - decay)


def _digest_of(path: Path) -> str | None:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("digest")
