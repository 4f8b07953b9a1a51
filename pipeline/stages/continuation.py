"""The baseline and adapt stages: continue every clip from its first K frames and score frames [K, T).

Both arms share this code path and the per-clip sampling seeds, so a difference between them is the
adaptation's doing; with 0 adaptation steps the adapted arm reproduces the baseline exactly. The
baseline stage also scores the reference predictors (REFERENCE_LABELS) on every clip.
"""
from __future__ import annotations

import random
import resource
import sys
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ..runtime import ranks
from ..adaptation import METHODS, make_adapter
from ..adaptation.base import WeightAdapter
from ..adaptation.batched_lora import BatchedLora
from ..adaptation.trainer import adapt_clips_together
from ..runtime.cluster import Shard, check_store_for_many_writers, preemptible
from ..config import NOT_RESULT_SETTINGS, Config, ConfigError, eval_points
from ..data.manifest import ClipRecord, read_manifest, resolve_clip_path, select_clips
from ..data.video_io import VideoError, frames_hash, read_video
from ..evaluation.metrics import Scorer, frame_metrics
from ..evaluation.registry import LOWER_IS_BETTER
from ..evaluation.temporal import extrapolate_motion, temporal_metrics
from ..models import VideoBackend, load_backend, reference_deviations
from ..models.base import frames_to_tensor, tensor_to_frames, weights_fingerprint
from ..runtime.progress import Progress
from ..seeds import derive_seed
from ..tracking.runs import (TAG_CLASS, TAG_INPUTS, TAG_PARTNER, TAG_SOURCE, TAG_WEIGHTS,
                             close_stale_stage_runs, finished_clips, get_or_create_experiment, name_launcher_run_idle,
                             point_stage_run, stage_run)
from ..models.latent_cache import LatentCache
from ..tracking.recorder import Recorder

STAGE_SECTIONS = {
    "baseline": ("data", "model", "sampling", "evaluation"),
    "adapt": ("data", "model", "sampling", "evaluation", "adaptation"),
}


# scored by the baseline stage on every clip, like an arm, as metrics `<name>_<metric>`
REFERENCE_LABELS = {"repeat_last": "repeat the last context frame (no model: a floor)",
                    "linear_motion": "the last two context frames' optical flow continued (no model: a floor)",
                    "vae_recon": "VAE reconstruction of the target (the VAE's ceiling)"}


def stage_digest(config: Config, stage: str) -> str:
    """The config part of a result's key (the clip's inputs and the model weights complete it)."""
    return config.digest(*STAGE_SECTIONS[stage], exclude=NOT_RESULT_SETTINGS)


def sham_partners(records: list[ClipRecord], seed: int) -> dict[str, ClipRecord]:
    """adaptation.data=other: each clip of a split -> the clip whose context its sham arm adapts on.
    One seeded cycle through the whole split (not just the selected clips), so no clip is its own
    partner and the pairing does not depend on num_clips or the shard."""
    if len(records) < 2:
        raise ValueError("adaptation.data=other adapts on another clip's context: the split needs at least 2 clips")
    order = sorted(records, key=lambda r: r.clip_id)
    random.Random(derive_seed(seed, "sham")).shuffle(order)
    return {r.clip_id: order[(i + 1) % len(order)] for i, r in enumerate(order)}


def partners_for(config: Config, stage: str, split: list[ClipRecord]) -> dict[str, ClipRecord]:
    """The sham arm's partners (see sham_partners); none in every other arm."""
    if stage == "adapt" and config.adaptation.data == "other":
        return sham_partners(split, config.adaptation.noise_seed)
    return {}


def clip_inputs(config: Config, stage: str, clips: list[ClipRecord], split: list[ClipRecord]) -> dict[str, str]:
    """clip id -> the hash of every frame its result depends on: the clip's own content hash, and in
    the sham arm its partner's too. A result made from other frames never matches."""
    partners = partners_for(config, stage, split)
    return {c.clip_id: c.content_hash + (f"+{partners[c.clip_id].content_hash}" if partners else "") for c in clips}


@dataclass
class ClipFrames:
    """A clip's decoded frames and, in the sham arm, its partner's whose context it adapts on."""

    record: ClipRecord
    frames: np.ndarray
    partner: ClipRecord | None = None
    partner_frames: np.ndarray | None = None


@dataclass
class ClipOutput:
    first: np.ndarray  # the first sample's frames [0, T), for the videos
    metrics: dict[str, float]  # per clip: mean over samples, best-of-N, spread, references, costs
    per_frame: dict[str, list[float]]  # per frame of [K, T): mean over samples; references
    per_sample: dict[str, list[float]]  # per sample: its clip mean
    features: dict[str, np.ndarray]  # for FVD: 'i3d' (one row per sample), 'truth_i3d' (baseline); {} without I3D
    weights: dict[str, torch.Tensor]  # the clip's adapted LoRA weights with adaptation.save_weights, else {}


class Continuer:
    """Holds the model (and adapter) for a whole stage; `run(clip)` handles one clip, `run_group(clips)`
    several together (sampling.clips_per_batch)."""

    def __init__(self, config: Config, stage: str, backend: VideoBackend | None = None):
        self.config, self.stage = config, stage
        self.backend = backend or load_backend(config)
        # of the weights as loaded, before any adapter is attached: part of every result's key
        self.weights = weights_fingerprint(self.backend.transformer) + (
            f"+{weights_fingerprint(self.backend.vae)}" if self.backend.vae is not None else "")
        d = config.data
        self.layout = self.backend.frame_layout(d.frames, d.context, d.height, d.width)
        self.clips_per_batch = config.sampling.clips_per_batch
        self.adapter = make_adapter(self.backend, config.adaptation) if self.clips_per_batch == 1 and stage == "adapt" \
            else None
        self.batched = None  # the adapters of clips adapted together
        if self.clips_per_batch > 1 and stage == "adapt":
            if not self.backend.batches_clips:
                raise ValueError(f"sampling.clips_per_batch={self.clips_per_batch}: {type(self.backend).__name__} "
                                 "adapts one clip at a time; use sampling.clips_per_batch=1")
            self.batched = BatchedLora(self.backend, config.adaptation, self.clips_per_batch)
        self.latents = LatentCache.for_stage(config, self.backend, self.layout.conditioned_pixel_frames)
        self.scorer = Scorer(config.evaluation.lpips, config.evaluation.lpips_net, self.backend.device)
        self.scorer.check_fvd_input(d.frames - d.context, d.height, d.width)

    def load_clip(self, manifest: Path, record: ClipRecord) -> np.ndarray:
        """The clip's T frames, checked against its shape and the manifest's content hash."""
        d = self.config.data
        path = resolve_clip_path(manifest, record)
        frames, _ = read_video(path, max_frames=d.frames)
        if len(frames) < d.frames:
            raise VideoError(path, f"too short: {len(frames)} frames, the clip needs T={d.frames}")
        if frames.shape[1:3] != (d.height, d.width):
            raise VideoError(path, f"frame size {frames.shape[2]}x{frames.shape[1]} differs from the configured "
                                   f"{d.width}x{d.height}; run preprocess with this config")
        if not record.content_hash:
            raise VideoError(path, "the manifest has no content hash for this clip (written by an older version): "
                                   "run the preprocess stage again")
        if frames_hash(frames) != record.content_hash:
            raise VideoError(path, f"content differs from the manifest's hash {record.content_hash} (the file "
                                   "changed after preprocessing): run the preprocess stage again")
        return frames

    def load_inputs(self, manifest: Path, record: ClipRecord, partner: ClipRecord | None) -> ClipFrames:
        frames = self.load_clip(manifest, record)
        if partner is None:
            return ClipFrames(record, frames)
        return ClipFrames(record, frames, partner, self.load_clip(manifest, partner))

    def _context_latents(self, record: ClipRecord, frames: np.ndarray) -> tuple[torch.Tensor, bool]:
        backend = self.backend
        context = frames[: self.layout.conditioned_pixel_frames]
        return self.latents.context(record.clip_id, record.content_hash,
                                    lambda: backend.encode(frames_to_tensor(context, backend.device)), backend.device)

    def sample_seeds(self, record: ClipRecord) -> list[int]:
        """Sample n of a clip draws from (sampling.seed, clip id, n): the same noise in every arm."""
        return [derive_seed(self.config.sampling.seed, record.clip_id, n) for n in range(self.config.sampling.samples)]

    def adapt(self, clip: ClipFrames, seeds: list[int], at: Collection[int] = (),
              visit: Callable[[int, torch.Tensor, dict[str, float]], None] | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """Encode the context (or read it from the latent cache) and, in the adapt stage, fit the
        adapter to the clip (every rank) before its samples (from `seeds`) are drawn: on its context,
        the whole clip (oracle) or another clip's context (sham). After each step count in `at`,
        `visit(steps, context latents, figures)` runs with the adapter in that state."""
        backend = self.backend
        start = time.perf_counter()
        context_latents, cached = self._context_latents(clip.record, clip.frames)
        timing = {"encode_seconds": _seconds_since(start, backend.device), "context_cached": float(cached)}
        _reset_peak_memory(backend.device)
        if self.adapter is None:
            return context_latents, timing
        self.adapter.reset()
        on_step = None if visit is None else (lambda steps, figures: visit(steps, context_latents,
                                                                           {**timing, **figures}))
        return context_latents, {**timing, **self.adapter.fit(self.window(clip, context_latents), self.noise_seed(clip),
                                                              self.layout.latent_frames, seeds, at, on_step)}

    def window(self, clip: ClipFrames, context_latents: torch.Tensor) -> torch.Tensor:
        """What the clip is adapted on: its context, another clip's (sham) or the whole clip (oracle)."""
        data = self.config.adaptation.data
        if data == "context":
            return context_latents
        if data == "other":
            return self._context_latents(clip.partner, clip.partner_frames)[0]
        return self.backend.encode(frames_to_tensor(clip.frames, self.backend.device))

    def noise_seed(self, clip: ClipFrames) -> int:
        return derive_seed(self.config.adaptation.noise_seed, clip.record.clip_id)

    def run_group(self, clips: list[ClipFrames], at: Collection[int] = (),
                  emit: Callable[[int, int, ClipOutput], None] | None = None) -> list[ClipOutput | Exception]:
        """sampling.clips_per_batch: in the adapt stage the clips adapted together, each with its own
        LoRA adapter and the draws `run` makes for it; then sampled in one batch. Per clip its output
        (as `run` makes it, up to float rounding; seconds are the group's shared out per clip) or the
        error it failed with. After each step count in `at`, `emit(i, steps, output)` receives clip
        i's output at that many steps (for the clips whose loss is still finite)."""
        cfg, backend, n = self.config, self.backend, self.config.sampling.samples
        seeds = [self.sample_seeds(clip.record) for clip in clips]
        encoded, timing = [], []
        for clip in clips:
            start = time.perf_counter()
            context_latents, cached = self._context_latents(clip.record, clip.frames)
            encoded.append(context_latents)
            timing.append({"encode_seconds": _seconds_since(start, backend.device), "context_cached": float(cached),
                           "clips_per_batch": float(len(clips))})

        def continue_group(fits: list[dict[str, float] | Exception]) -> list[ClipOutput | Exception]:
            """The clips that have figures (not an error) sampled in one batch, inside the adapters' routing."""
            adapted = [i for i, fit in enumerate(fits) if not isinstance(fit, Exception)]
            outputs: list[ClipOutput | Exception] = list(fits)
            if not adapted:
                return outputs
            start = time.perf_counter()
            with self.batched.route(adapted, n) if self.batched is not None else nullcontext():
                latents = backend.sample_batch(torch.cat([encoded[i].expand(n, *encoded[i].shape[1:]) for i in adapted]),
                                               self.layout.latent_frames, [s for i in adapted for s in seeds[i]])
            sample_seconds = _seconds_since(start, backend.device) / len(adapted)
            for k, i in enumerate(adapted):
                weights = self.batched.clip_state_dict(i) if self.batched and cfg.adaptation.save_weights else {}
                outputs[i] = self.score(clips[i], seeds[i], latents[k * n:(k + 1) * n],
                                        {**timing[i], **fits[i], "sample_seconds": sample_seconds}, weights)
            return outputs

        def visit(steps: int, fits: list[dict[str, float] | Exception]) -> None:
            for i, output in enumerate(continue_group(fits)):
                if not isinstance(output, Exception):
                    emit(i, steps, output)

        _reset_peak_memory(backend.device)
        fits: list[dict[str, float] | Exception] = [{} for _ in clips]
        if self.batched is not None:
            self.batched.reset()
            fits = adapt_clips_together(backend, self.batched, [self.window(c, e) for c, e in zip(clips, encoded)],
                                        cfg.adaptation, [self.noise_seed(clip) for clip in clips], at,
                                        visit if emit is not None else None)
        return continue_group(fits)

    def run(self, clip: ClipFrames, at: Collection[int] = (),
            emit: Callable[[int, ClipOutput], None] | None = None) -> ClipOutput:
        """Adapt (adapt stage), then `sampling.samples` continuations in one batch, each from the seed
        derived from (sampling.seed, clip id, sample): the same noise in every arm. After each step
        count in `at` (adaptation.eval_at), `emit(steps, output)` receives the output an arm of that
        many steps makes, from the same adaptation."""
        seeds = self.sample_seeds(clip.record)

        def visit(steps: int, context_latents: torch.Tensor, metrics: dict[str, float]) -> None:
            emit(steps, self.continue_clip(clip, context_latents, seeds, metrics))

        context_latents, metrics = self.adapt(clip, seeds, at, visit if emit is not None else None)
        return self.continue_clip(clip, context_latents, seeds, metrics)

    def continue_clip(self, clip: ClipFrames, context_latents: torch.Tensor, seeds: list[int],
                      metrics: dict[str, float]) -> ClipOutput:
        """The clip's samples from the model as it is now, scored (with `metrics`, the adaptation's)."""
        start = time.perf_counter()
        latents = self.backend.sample_batch(context_latents.expand(len(seeds), *context_latents.shape[1:]),
                                            self.layout.latent_frames, seeds,
                                            noise=self.adapter.sampling_noise() if self.adapter is not None else None)
        save = self.adapter is not None and self.config.adaptation.save_weights
        return self.score(clip, seeds, latents, {**metrics, "sample_seconds": _seconds_since(start, self.backend.device)},
                          self.adapter.state_dict() if save else {})

    def score(self, clip: ClipFrames, seeds: list[int], latents: torch.Tensor, metrics: dict[str, float],
              weights: dict[str, torch.Tensor]) -> ClipOutput:
        """The clip's sampled latents (one per seed) decoded and scored, beside `metrics` (adaptation and sampling)."""
        cfg, backend = self.config, self.backend
        K, frames = cfg.data.context, clip.frames
        metrics = {**metrics, "decode_seconds": 0.0, "metrics_seconds": 0.0}
        samples, continuity, first, videos = [], [], None, []
        for seed, sample_latents in zip(seeds, latents):
            start = time.perf_counter()
            output = self._decode(sample_latents[None], seed)
            metrics["decode_seconds"] += time.perf_counter() - start
            start = time.perf_counter()
            samples.append(self.scorer.frames(output[K:], frames[K:], frames[K - 1]))
            continuity.append(frame_metrics(output[K:K + 1], frames[K - 1:K], device=backend.device)["psnr"][0])
            metrics["metrics_seconds"] += time.perf_counter() - start
            first = output if first is None else first
            videos.append(output[K:])
        start = time.perf_counter()
        features = self.scorer.features(np.stack(videos))
        metrics["metrics_seconds"] += time.perf_counter() - start
        features = {} if features is None else {"i3d": features}
        metrics.update(_peak_memory(backend.device))
        per_frame = {name: np.mean([s[name] for s in samples], axis=0).tolist() for name in samples[0]}
        per_sample = {name: [float(np.mean(s[name])) for s in samples] for name in samples[0]}
        for name, values in per_sample.items():
            best = min(values) if name in LOWER_IS_BETTER else max(values)
            metrics.update({name: float(np.mean(values)), f"{name}_best": best,
                            f"{name}_sample_sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0})
        # does the prefix condition the model? the first generated frame against the truth and
        # against the last context frame (a model that ignores its prefix is far from both)
        metrics.update(first_frame_psnr=per_frame["psnr"][0], continuity_psnr=float(np.mean(continuity)))
        if self.stage == "baseline":
            start = time.perf_counter()
            references = self._references(clip)
            metrics["reference_seconds"] = time.perf_counter() - start
            per_frame.update(references)
            metrics.update({name: float(np.mean(values)) for name, values in references.items()})
            metrics["truth_continuity_psnr"] = references["repeat_last_psnr"][0]  # frame K against frame K-1
            # the truth's own frame-to-frame change: what a continuation's warp error and flicker compare with
            metrics.update({f"truth_{name}": float(np.mean(values))
                            for name, values in temporal_metrics(frames[K - 1], frames[K:]).items()})
            if features:
                features["truth_i3d"] = self.scorer.features(frames[None, K:])
        return ClipOutput(first, metrics, per_frame, per_sample, features, weights)

    def _decode(self, latents: torch.Tensor, seed: int) -> np.ndarray:
        generator = torch.Generator(self.backend.device).manual_seed(seed)
        return tensor_to_frames(self.backend.decode(latents, generator))[: self.config.data.frames]  # some decode more

    def _references(self, clip: ClipFrames) -> dict[str, list[float]]:
        """Predictors scored like an arm, per frame of [K, T): the last context frame repeated and the
        last two frames' motion continued (no model: floors), and with a VAE the target encoded and
        decoded (what the VAE alone allows)."""
        K, frames, device = self.config.data.context, clip.frames, self.backend.device
        predictions = {"repeat_last": np.repeat(frames[K - 1: K], len(frames) - K, axis=0)}
        if K >= 2:
            predictions["linear_motion"] = extrapolate_motion(frames[K - 2], frames[K - 1], len(frames) - K)
        if self.backend.vae is not None:
            seed = derive_seed(self.config.sampling.seed, "vae_recon")
            latents = self.backend.latents_from(self.backend.encode(frames_to_tensor(frames, device)),
                                                torch.Generator(device).manual_seed(seed))
            predictions["vae_recon"] = self._decode(latents, seed)[K:]
        return {f"{ref}_{name}": values for ref, prediction in predictions.items()
                for name, values in self.scorer.frames(prediction, frames[K:], frames[K - 1]).items()}


def run_stage(config: Config, stage: str, backend: VideoBackend | None = None, shard: Shard = Shard()) -> str:
    """Run baseline or adapt over the configured clips (this task's shard of them); returns the
    stage's parent run id ("" when every clip already had a result, or on a rank > 0).
    SIGTERM/SIGUSR1 abandon the current clip and raise Preempted."""
    d = config.data
    if ranks.world_size() > 1 and stage != "adapt":
        raise ValueError(f"{stage}: several processes per clip (torchrun) only help the adapt stage")
    if ranks.world_size() > 1 and config.sampling.clips_per_batch > 1:
        raise ValueError("sampling.clips_per_batch batches clips on one GPU; under torchrun each clip uses every GPU")
    ranks.init()
    if ranks.is_main():
        check_store_for_many_writers(shard)
    split = select_clips(read_manifest(d.manifest), d.split, 0)
    clips = shard.select(select_clips(split, d.split, d.num_clips))
    if not clips:
        raise ConfigError(f"{d.manifest} has no clips in split '{d.split}' for shard {shard} (data.split, "
                          "data.test_fraction at preprocessing)")
    inputs = clip_inputs(config, stage, clips, split)
    partners = partners_for(config, stage, split)
    arms = step_arms(config, stage)
    final = config.adaptation.steps
    digests = {steps: stage_digest(arm, stage) for steps, arm in arms.items()}
    continuer = Continuer(config, stage, backend)
    if not ranks.is_main():
        _follow_main_rank(continuer, d.manifest, {c.clip_id: c for c in clips}, partners)
        ranks.finish()
        return ""
    if ranks.world_size() == 1:  # nothing to do: no empty stage run
        experiment_id = get_or_create_experiment(config.experiment)
        done = {steps: finished_clips(experiment_id, stage, digest, inputs, continuer.weights)
                for steps, digest in digests.items()}
        if all(c.clip_id in done[steps] for c in clips for steps in arms):
            for digest in digests.values():
                close_stale_stage_runs(experiment_id, stage, digest, shard)  # a killed run's, done since
            name_launcher_run_idle(f"nothing to do: {arm_run_name(config, stage)}")
            print(f"[{stage}] nothing to do: all {len(clips)} clips already have a finished result for this "
                  "config, model and clip content", flush=True)
            return ""
    with preemptible(), stage_run(config, stage, digests[final], arm_run_name(config, stage), shard) as parent, \
            ExitStack() as points:
        parents = {final: parent}
        for steps, arm in arms.items():
            if steps != final:
                parents[steps] = points.enter_context(point_stage_run(arm, stage, digests[steps],
                                                                      arm_run_name(arm, stage), parent, shard))
        tags = {TAG_WEIGHTS: continuer.weights, "tta.baseline_digest": stage_digest(config, "baseline"),
                "tta.conditioned_pixel_frames": str(continuer.layout.conditioned_pixel_frames),
                **{f"tta.network.{metric}": network for metric, network in continuer.scorer.networks.items()},
                **{f"tta.{metric}": note for metric, note in continuer.scorer.unavailable.items()}}
        client = MlflowClient()
        for steps, run in parents.items():
            client.log_param(run.info.run_id, "shard", str(shard))
            for key, value in {**tags, "tta.arm": arm_label(arms[steps], stage)}.items():
                client.set_tag(run.info.run_id, key, value)
        log_clips_as_dataset(config, stage, clips)
        for note in continuer.scorer.unavailable.values():
            print(f"[{stage}] {note}", file=sys.stderr, flush=True)
        done = {steps: finished_clips(parent.info.experiment_id, stage, digest, inputs, continuer.weights)
                for steps, digest in digests.items()}
        needed = {c.clip_id: [steps for steps in arms if c.clip_id not in done[steps]] for c in clips}
        todo = [c for c in clips if needed[c.clip_id]]
        ranks.broadcast([c.clip_id for c in todo])
        if len(todo) < len(clips):
            print(f"[{stage}] resuming: {len(clips) - len(todo)} of {len(clips)} clips already finished", flush=True)
        progress = Progress(stage, len(clips), done=len(clips) - len(todo), every_seconds=0)
        last = {clip_id: max(steps) for clip_id, steps in needed.items() if steps}
        recorders = {steps: Recorder(d, stage, digests[steps], run, on_end=_reporter(stage, progress, steps, last))
                     for steps, run in parents.items()}
        try:
            _run_clips(continuer, recorders, todo, needed, partners, inputs, arms)
        finally:
            for recorder in recorders.values():
                recorder.close()  # every clip handed over is recorded, also when stopping
        for steps, recorder in recorders.items():
            client.log_batch(parents[steps].info.run_id, metrics=[
                Metric(key, value, int(time.time() * 1000), 0)
                for key, value in {"clips_total": len(clips), "clips_failed": recorder.failures}.items()])
    ranks.finish()
    return parent.info.run_id


def step_arms(config: Config, stage: str) -> dict[int, Config]:
    """The arms one invocation records, by their adaptation steps: the config's own and, in the adapt
    stage, one per step s of adaptation.eval_at (the config with adaptation.steps=s), all from the
    same adaptation of each clip."""
    arms = {config.adaptation.steps: config}
    if stage == "adapt":
        for steps in eval_points(config.adaptation):
            arms[steps] = config.with_setting("adaptation.steps", steps).with_setting("adaptation.eval_at", "")
    return arms


def log_clips_as_dataset(config: Config, stage: str, clips: list[ClipRecord]) -> None:
    """The clips of this invocation as the run's MLflow dataset input (the UI's Dataset column),
    named after the data folder and split, with the manifest as its source."""
    import pandas as pd

    d = config.data
    dataset = mlflow.data.from_pandas(pd.DataFrame([vars(c) for c in clips]), source=str(d.manifest),
                                      name=f"{Path(d.output_dir).name}/{d.split}")
    try:
        mlflow.log_input(dataset, context=stage)
    except mlflow.exceptions.MlflowException:
        # the tracking server checks for the dataset and then inserts it, so two shards logging the
        # same clips at once can both miss it and one insert fails; the second try finds its row
        mlflow.log_input(dataset, context=stage)


def _reporter(stage: str, progress: Progress, steps: int, last: dict[str, int]
              ) -> Callable[[str, BaseException | None], None]:
    """Says a clip failed; advances the progress when the clip's last arm (`last`: clip -> its most
    steps still to record) is recorded."""
    def report(clip_id: str, error: BaseException | None) -> None:  # on the recorder's tracking thread
        if error is not None:
            print(f"[{stage}] clip {clip_id} failed: {error}", file=sys.stderr, flush=True)
        if last.get(clip_id) == steps:
            progress.advance(clip_id, "FAILED" if error else "")
    return report


def _run_clips(continuer: Continuer, recorders: dict[int, Recorder], todo: list[ClipRecord],
               needed: dict[str, list[int]], partners: dict[str, ClipRecord], inputs: dict[str, str],
               arms: dict[int, Config]) -> None:
    """Each clip in its own child run of every arm (by steps) it has no finished result in yet, tagged
    with what its result was made from; `continuer.clips_per_batch` clips at a time."""
    manifest = continuer.config.data.manifest
    io = recorders[continuer.config.adaptation.steps]

    def load(group: list[ClipRecord]) -> dict[str, Future]:  # decoded on I/O threads while the previous group runs
        return {r.clip_id: io.load(continuer.load_inputs, manifest, r, partners.get(r.clip_id)) for r in group}

    groups = [todo[i:i + continuer.clips_per_batch] for i in range(0, len(todo), continuer.clips_per_batch)]
    ahead = load(groups[0]) if groups else {}
    for g, group in enumerate(groups):
        frames = ahead
        if g + 1 < len(groups):
            ahead = load(groups[g + 1])
        runs = {}
        for record in group:
            tags = {TAG_CLASS: record.label, TAG_SOURCE: record.source, TAG_INPUTS: inputs[record.clip_id],
                    TAG_WEIGHTS: continuer.weights}
            if record.clip_id in partners:
                tags[TAG_PARTNER] = partners[record.clip_id].clip_id
            runs[record.clip_id] = {steps: recorders[steps].start(record.clip_id, {
                **tags, "tta.arm": arm_label(arms[steps], continuer.stage)}) for steps in needed[record.clip_id]}
        try:
            _run_group(continuer, recorders, runs, frames)
        except BaseException as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            for clip_id, clip_runs in runs.items():  # the arms not recorded before it failed
                for steps, run in clip_runs.items():
                    recorders[steps].fail(run, clip_id, exc)
            if not isinstance(exc, Exception):  # preempted or interrupted: the clips are KILLED, the stage stops
                raise


def _follow_main_rank(continuer: Continuer, manifest: Path, clips: dict[str, ClipRecord],
                      partners: dict[str, ClipRecord]) -> None:
    """A rank > 0: adapt to the clips rank 0 lists, in its order, adding noise draws to its batch."""
    for clip_id in ranks.broadcast(None):
        try:
            continuer.adapt(continuer.load_inputs(manifest, clips[clip_id], partners.get(clip_id)),
                            continuer.sample_seeds(clips[clip_id]))
        except Exception as exc:  # rank 0 records the clip's failure
            print(f"[rank {ranks.rank()}] clip {clip_id} failed: {exc}", file=sys.stderr, flush=True)


def _run_group(continuer: Continuer, recorders: dict[int, Recorder], runs: dict[str, dict[int, Future]],
               frames: dict[str, Future]) -> None:
    """A group of clips (one, unless sampling.clips_per_batch), each recorded in the arms of its
    `runs` (by steps; each removed once recorded; a clip that fails alone fails in them), with its
    wall time split: model compute (encode, adapt, sample, decode) against the rest on this thread
    (waiting for the clip's frames, scoring, handing the clip to the recorder), logged as
    `non_model_share` (an eval_at arm's clip_seconds run up to its own record); the baseline's
    reference predictors are timed apart (`reference_seconds`)."""
    start = time.perf_counter()
    clips, load_seconds = {}, {}
    for clip_id, future in frames.items():
        try:
            clips[clip_id] = future.result()  # decoded on an I/O thread; a bad file raises its VideoError here
        except Exception as exc:
            _fail(recorders, runs, clip_id, exc)
        load_seconds[clip_id] = time.perf_counter() - start

    def record(clip_id: str, steps: int, out: ClipOutput) -> None:
        if steps not in runs[clip_id]:  # finished by an earlier invocation: never recorded twice
            return
        recording = time.perf_counter()
        recorders[steps].wait_for_slot()
        end = time.perf_counter()
        metrics, loaded = out.metrics, load_seconds[clip_id]  # reference_seconds is a part of its own
        metrics.update(load_seconds=loaded, record_seconds=end - recording, clip_seconds=end - start,
                       non_model_share=(loaded + metrics["metrics_seconds"] + end - recording) / (end - start))
        recorders[steps].record(runs[clip_id].pop(steps), clip_id, clips[clip_id].frames, out.first, metrics,
                                out.per_frame, out.per_sample, out.weights, out.features)

    final = continuer.config.adaptation.steps
    if continuer.clips_per_batch == 1:
        for clip_id, clip in clips.items():
            record(clip_id, final, continuer.run(clip, set(runs[clip_id]) - {final},
                                                 lambda steps, out: record(clip_id, steps, out)))
        return
    if not clips:
        return
    ids = list(clips)
    points = set().union(*(runs[clip_id] for clip_id in ids)) - {final}  # a point some clip still needs
    outputs = continuer.run_group(list(clips.values()), points, lambda i, steps, out: record(ids[i], steps, out))
    for clip_id, out in zip(ids, outputs):
        if isinstance(out, Exception):
            _fail(recorders, runs, clip_id, out)
        else:
            record(clip_id, final, out)


def _fail(recorders: dict[int, Recorder], runs: dict[str, dict[int, Future]], clip_id: str, error: Exception) -> None:
    """One clip of a group failed alone: each arm it has not been recorded in yet says why."""
    for steps, run in runs[clip_id].items():
        recorders[steps].fail(run, clip_id, error)
    runs[clip_id].clear()


def arm_run_name(config: Config, stage: str) -> str:
    """The stage run's name: `baseline`, or the arm's method and settings (`lora-r16-lr0.001-40steps`),
    sham and oracle arms marked."""
    batched = f"-b{config.sampling.clips_per_batch}" if config.sampling.clips_per_batch > 1 else ""
    if stage == "baseline":
        return "baseline" + batched
    a = config.adaptation
    return METHODS[a.method].names(a)[1] + batched + {"other": "-sham", "oracle": "-oracle"}.get(a.data, "")


def arm_label(config: Config, stage: str) -> str:
    trains = stage != "baseline" and issubclass(METHODS[config.adaptation.method], WeightAdapter)
    deviations = reference_deviations(config, trains=trains)
    note = f" [not the reference: {', '.join(deviations)}]" if deviations else ""
    if config.sampling.clips_per_batch > 1:
        note += f" ({config.sampling.clips_per_batch} clips per batch)"
    if stage == "baseline":
        return "baseline" + note
    a = config.adaptation
    label = f"{METHODS[a.method].names(a)[0]} on {a.data}{note}"
    if a.data == "oracle":
        return label + " (ORACLE: sees the target frames, upper bound)"
    return label + " (SHAM: another clip's context)" if a.data == "other" else label


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
