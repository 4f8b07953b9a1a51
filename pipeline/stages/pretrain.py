"""Pretrain the small default model on the train split so that it can continue clips at all.

Rectified-flow training with a random clean prefix (and sometimes none), the same objective the
backend uses at test time. The result is a safetensors file that records the digest of its settings;
a rerun with the same settings skips. Weights are never overwritten (results refer to them): new
settings write `<name>.<digest>.safetensors` beside `model.weights`, and later stages of the same
`experiment` command use that file.
"""
from __future__ import annotations

import random
from pathlib import Path

import mlflow
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adaptation.optim import TorchAdamW
from ..adaptation.trainer import train
from ..config import Config
from ..data.manifest import read_manifest, resolve_clip_path, select_clips
from ..data.video_io import read_video
from ..models import load_backend
from ..models.ltx_video import frames_to_tensor
from ..progress import Progress
from ..tracking.runs import stage_run

# what the weights depend on: the training clips, the architecture and the training settings (the
# loss is the backend's adaptation loss, with its noise-level draw)
# (not the output path, nor data settings that only later stages read)
INPUTS = ("data.source", "data.input_dir", "data.splits_dir", "data.split_id", "data.sample", "data.start_frame",
          "data.test_fraction", "data.frames", "data.height", "data.width", "data.fps", "data.train_clips",
          "data.seed", "model.backend", "model.pretrained", "model.patch_size", "model.layers", "model.heads",
          "model.head_dim", "model.prompt", "model.dtype", "adaptation.timesteps", "pretrain")


def weights_digest(config: Config) -> str:
    return config.digest(*INPUTS, exclude=("model.weights",))


def weights_path(config: Config) -> Path:
    """Where the weights for this config live: `model.weights` when it is free or holds exactly these
    settings' weights, else a file named by the digest beside it."""
    weights = Path(config.model.weights)
    if not weights.exists() or _digest_of(weights) == weights_digest(config):
        return weights
    return weights.with_name(f"{weights.stem}.{weights_digest(config)}{weights.suffix}")


def pretrain(config: Config) -> Path:
    if config.model.pretrained:
        raise ValueError("pretrain trains the small default model; model.pretrained is set, so there is nothing to do")
    weights = weights_path(config)
    digest = weights_digest(config)
    if weights.exists() and _digest_of(weights) == digest:
        print(f"[pretrain] {weights} is up to date (digest {digest}); skipping", flush=True)
        return weights
    if weights != Path(config.model.weights):
        print(f"[pretrain] {config.model.weights} holds weights of other settings; writing {weights} beside it "
              f"(use it with --set model.weights={weights})", flush=True)
    with stage_run(config, "pretrain", digest):
        seed = config.pretrain.seed
        torch.manual_seed(seed)
        backend = load_backend(config, random_weights=True)
        videos = _load_split(config, "train").to(backend.device)
        latents = backend.encode(videos)
        frames = latents.shape[2]
        rng = random.Random(seed)
        generator = torch.Generator(backend.device).manual_seed(seed)
        p = config.pretrain
        progress = Progress("pretrain", p.steps, every_seconds=10)

        def loss_fn(step: int) -> torch.Tensor:
            batch = latents[torch.tensor(rng.sample(range(len(latents)), p.batch_size))]
            clean = 0 if rng.random() < p.unconditional_prob else rng.randint(1, frames - 1)
            return backend.training_loss(batch, clean, generator)

        def on_step(step: int, loss: float) -> None:
            mlflow.log_metric("train_loss", loss, step=step)
            progress.update(step, f"step {step}", f"loss {loss:.4f}")

        backend.transformer.requires_grad_(True).train()
        optimizer = TorchAdamW(list(backend.transformer.parameters()), p.lr, p.warmup)
        train(optimizer, loss_fn, p.steps, on_step, log_every=25)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in backend.transformer.state_dict().items()}
        partial = weights.with_name(weights.name + ".partial")
        save_file(state, str(partial), metadata={"digest": digest})
        partial.replace(weights)
        mlflow.log_metric("weights_mb", weights.stat().st_size / 2**20)
    return weights


def _digest_of(path: Path) -> str | None:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("digest")


def _load_split(config: Config, split: str) -> torch.Tensor:
    d = config.data
    records = select_clips(read_manifest(d.manifest), split, 0)
    if len(records) < config.pretrain.batch_size:
        raise ValueError(f"{d.manifest}: {len(records)} '{split}' clips, fewer than pretrain.batch_size")
    clips = [frames_to_tensor(read_video(resolve_clip_path(d.manifest, r), d.frames)[0][: d.frames]) for r in records]
    return torch.cat(clips)
