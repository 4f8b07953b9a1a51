"""The baseline and adapt stages: continue every clip from its first K frames and score frames [K, T).

Both arms share this code path and the sampling seed, so a difference between them is the
adaptation's doing; with 0 adaptation steps the adapted arm reproduces the baseline exactly.
"""
from __future__ import annotations

import resource
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Run

from .. import ranks
from ..adaptation import make_adapter
from ..adaptation.trainer import adapt_to_clip
from ..cluster import Shard, check_store_for_many_writers, preemptible
from ..config import Config
from ..data.manifest import ClipRecord, read_manifest, resolve_clip_path, select_clips
from ..data.video_io import VideoError, read_video
from ..evaluation.metrics import LpipsUnavailable, frame_metrics, load_lpips
from ..models import VideoBackend, load_backend
from ..models.ltx_video import frames_to_tensor, tensor_to_frames
from ..progress import Progress
from ..tracking.runs import finished_clips, stage_run
from .latent_cache import LatentCache
from .recorder import Recorder

STAGE_SECTIONS = {
    "baseline": ("data", "model", "sampling", "evaluation"),
    "adapt": ("data", "model", "sampling", "evaluation", "adaptation"),
}


def stage_digest(config: Config, stage: str) -> str:
    return config.digest(*STAGE_SECTIONS[stage])


class Continuer:
    """Holds the model (and adapter) for a whole stage; `run(clip)` handles one clip."""

    def __init__(self, config: Config, stage: str, backend: VideoBackend | None = None):
        self.config, self.stage = config, stage
        self.backend = backend or load_backend(config)
        d = config.data
        self.layout = self.backend.frame_layout(d.frames, d.context, d.height, d.width)
        self.adapter = make_adapter(self.backend, config.adaptation) if stage == "adapt" else None
        self.latents = LatentCache.for_stage(config, self.backend, self.layout.conditioned_pixel_frames)
        self.lpips, self.lpips_note = None, ""
        if config.evaluation.lpips:
            try:
                self.lpips = load_lpips(config.evaluation.lpips_net, self.backend.device)
            except LpipsUnavailable as exc:
                self.lpips_note = str(exc)

    def load_clip(self, manifest: Path, record: ClipRecord) -> np.ndarray:
        d = self.config.data
        path = resolve_clip_path(manifest, record)
        frames, _ = read_video(path, max_frames=d.frames)
        if len(frames) < d.frames:
            raise VideoError(path, f"too short: {len(frames)} frames, the clip needs T={d.frames}")
        if frames.shape[1:3] != (d.height, d.width):
            raise VideoError(path, f"frame size {frames.shape[2]}x{frames.shape[1]} differs from the configured "
                                   f"{d.width}x{d.height}; run preprocess with this config")
        return frames

    def adapt(self, clip_id: str, frames: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        """Encode the context (or read it from the latent cache) and, in the adapt stage, fit the
        adapter to the clip (every rank)."""
        cfg, backend = self.config, self.backend
        start = time.perf_counter()
        context = frames[: self.layout.conditioned_pixel_frames]
        context_latents, cached = self.latents.context(
            clip_id, lambda: backend.encode(frames_to_tensor(context, backend.device)), backend.device)
        timing = {"encode_seconds": _seconds_since(start, backend.device), "context_cached": float(cached)}
        _reset_peak_memory(backend.device)
        if self.adapter is None:
            return context_latents, timing
        self.adapter.reset()
        window = context_latents if cfg.adaptation.data == "context" else backend.encode(
            frames_to_tensor(frames, backend.device))
        return context_latents, {**timing, **adapt_to_clip(backend, self.adapter, window, cfg.adaptation, cfg.seed)}

    def run(self, clip_id: str, frames: np.ndarray) -> tuple[np.ndarray, dict[str, float], dict[str, list[float]]]:
        cfg, layout, backend = self.config, self.layout, self.backend
        K = cfg.data.context
        context_latents, metrics = self.adapt(clip_id, frames)
        start = time.perf_counter()
        latents = backend.sample(context_latents, layout.latent_frames, cfg.sampling.seed)
        metrics["sample_seconds"] = _seconds_since(start, backend.device)
        start = time.perf_counter()
        generator = torch.Generator(backend.device).manual_seed(cfg.sampling.seed)
        output = tensor_to_frames(backend.decode(latents, generator))[: cfg.data.frames]  # some decode more than T
        metrics["decode_seconds"] = time.perf_counter() - start
        metrics.update(_peak_memory(backend.device))
        start = time.perf_counter()
        per_frame = frame_metrics(output[K:], frames[K:], self.lpips, backend.device)
        metrics["metrics_seconds"] = time.perf_counter() - start
        metrics.update({name: float(np.mean(values)) for name, values in per_frame.items()})
        return output, metrics, per_frame


def run_stage(config: Config, stage: str, backend: VideoBackend | None = None, shard: Shard = Shard()) -> str:
    """Run baseline or adapt over the configured clips (this task's shard of them); returns the
    stage's parent run id. SIGTERM/SIGUSR1 abandon the current clip and raise Preempted."""
    d = config.data
    if ranks.world_size() > 1 and stage != "adapt":
        raise ValueError(f"{stage}: several processes per clip (torchrun) only help the adapt stage")
    ranks.init()
    if ranks.is_main():
        check_store_for_many_writers(shard)
    clips = shard.select(select_clips(read_manifest(d.manifest), d.split, d.num_clips))
    if not clips:
        raise ValueError(f"{d.manifest} has no clips in split '{d.split}' for shard {shard}")
    digest = stage_digest(config, stage)
    continuer = Continuer(config, stage, backend)
    if not ranks.is_main():
        _follow_main_rank(continuer, d.manifest, {c.clip_id: c for c in clips})
        ranks.finish()
        return ""
    with preemptible(), stage_run(config, stage, digest) as parent:
        mlflow.log_param("shard", str(shard))
        mlflow.set_tags({"tta.arm": arm_label(config, stage), "tta.conditioned_pixel_frames":
                         continuer.layout.conditioned_pixel_frames})
        if continuer.lpips_note:
            mlflow.set_tag("tta.lpips", continuer.lpips_note)
            print(f"[{stage}] {continuer.lpips_note}", file=sys.stderr, flush=True)
        done = finished_clips(parent.info.experiment_id, stage, digest)
        todo = [c for c in clips if c.clip_id not in done]
        ranks.broadcast([c.clip_id for c in todo])
        if done:
            print(f"[{stage}] resuming: {len(clips) - len(todo)} of {len(clips)} clips already finished", flush=True)
        progress = Progress(stage, len(clips), done=len(clips) - len(todo), every_seconds=0)
        failures = _run_clips(continuer, stage, digest, todo, progress, parent)
        mlflow.log_metrics({"clips_total": len(clips), "clips_failed": failures})
    ranks.finish()
    return parent.info.run_id


def _run_clips(continuer: Continuer, stage: str, digest: str, todo: list[ClipRecord], progress: Progress,
               parent: Run) -> int:
    """Each clip in its own child run of `parent`; returns how many failed."""
    d = continuer.config.data
    failures = 0

    def report(clip_id: str, error: BaseException | None) -> None:  # on the recorder's tracking thread
        nonlocal failures
        if error is not None:
            failures += 1
            print(f"[{stage}] clip {clip_id} failed: {error}", file=sys.stderr, flush=True)
        progress.advance(clip_id, "FAILED" if error else "")

    recorder = Recorder(d, stage, digest, parent, on_end=report)
    try:
        ahead = recorder.load(continuer.load_clip, d.manifest, todo[0]) if todo else None
        for i, record in enumerate(todo):
            frames = ahead
            if i + 1 < len(todo):  # decoded while this clip runs on the GPU
                ahead = recorder.load(continuer.load_clip, d.manifest, todo[i + 1])
            run = recorder.start(record)
            try:
                _run_clip(continuer, recorder, run, record.clip_id, frames)
            except Exception as exc:  # recorded on the clip's run; the stage goes on
                if isinstance(exc, torch.OutOfMemoryError):
                    torch.cuda.empty_cache()
                recorder.fail(run, record.clip_id, exc)
            except BaseException as exc:  # preempted or interrupted: the clip is KILLED, the stage stops
                recorder.fail(run, record.clip_id, exc)
                raise
    finally:
        recorder.close()  # every clip handed over is recorded, also when stopping
    return failures


def _follow_main_rank(continuer: Continuer, manifest: Path, clips: dict[str, ClipRecord]) -> None:
    """A rank > 0: adapt to the clips rank 0 lists, in its order, adding noise draws to its batch."""
    for clip_id in ranks.broadcast(None):
        try:
            continuer.adapt(clip_id, continuer.load_clip(manifest, clips[clip_id]))
        except Exception as exc:  # rank 0 records the clip's failure
            print(f"[rank {ranks.rank()}] clip {clip_id} failed: {exc}", file=sys.stderr, flush=True)


def _run_clip(continuer: Continuer, recorder: Recorder, run: Future, clip_id: str, frames_ahead: Future) -> None:
    """One clip, with its wall time split: model compute (encode, adapt, sample, decode) against the
    rest on this thread (waiting for the clip's frames, scoring, handing the clip to the recorder),
    logged as `non_model_share`."""
    start = time.perf_counter()
    frames = frames_ahead.result()  # decoded on an I/O thread; a bad file raises its VideoError here
    load_seconds = time.perf_counter() - start
    output, metrics, per_frame = continuer.run(clip_id, frames)
    weights = continuer.adapter.state_dict() if continuer.config.adaptation.save_weights and continuer.adapter else {}
    recording = time.perf_counter()
    recorder.wait_for_slot()
    end = time.perf_counter()
    metrics.update(load_seconds=load_seconds, record_seconds=end - recording, clip_seconds=end - start,
                   non_model_share=(load_seconds + metrics["metrics_seconds"] + end - recording) / (end - start))
    recorder.record(run, clip_id, frames, output, metrics, per_frame, weights)


def arm_label(config: Config, stage: str) -> str:
    if stage == "baseline":
        return "baseline"
    a = config.adaptation
    method = f"lora r{a.rank}" if a.method == "lora" else "full fine-tuning"
    label = f"{method} {a.steps} steps on {a.data}"
    return label + " (ORACLE: sees the target frames, upper bound)" if a.data == "oracle" else label


def _seconds_since(start: float, device: torch.device) -> float:
    """Wall seconds since `start`, once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # on a CPU the process-wide peak resident set is the closest figure there is
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
