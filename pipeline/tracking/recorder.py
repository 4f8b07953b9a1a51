"""Everything of a clip that is not model compute, off the main thread: the next clip is decoded
and the last clip's videos encoded on I/O threads, and every MLflow call of the clips runs in order
on one tracking thread, while the main thread keeps the GPU busy.

A clip's run is FINISHED only once its metrics and videos are logged, so a stage killed meanwhile
leaves it RUNNING and the clip is redone on resume. At most `in_flight` clips wait to be recorded;
beyond that the main thread waits, and that wait counts as the clip's `record_seconds`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from ..config import DataConfig
from ..data.video_io import write_video
from .runs import end_clip_run, start_clip_run

FEATURES_FILE = "features.npz"  # a clip's I3D features, for FVD over an arm's clips


class Recorder:
    def __init__(self, data: DataConfig, stage: str, digest: str, parent: Run,
                 on_end: Callable[[str, BaseException | None], None], in_flight: int = 2):
        self.data, self.stage, self.digest, self.parent = data, stage, digest, parent
        self.on_end = on_end  # (clip id, error or None) on the tracking thread, once the clip's run has ended
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="clip-io")
        self.tracking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-tracking")
        self.waiting: deque[Future] = deque()
        self.in_flight = in_flight
        self.failures = 0  # clips whose run ended FAILED or KILLED

    def load(self, load_clip: Callable[..., np.ndarray], *args) -> Future:
        return self.io.submit(load_clip, *args)

    def start(self, clip_id: str, tags: dict[str, str]) -> Future:
        """The clip's run (its id, once created)."""
        return self.tracking.submit(start_clip_run, self.parent.info.experiment_id, self.parent.info.run_id,
                                    self.stage, self.digest, clip_id, tags)

    def wait_for_slot(self) -> None:
        """Block while `in_flight` clips still wait to be recorded (their I/O is behind the GPU)."""
        while len(self.waiting) >= self.in_flight:
            self.waiting.popleft().result()

    def record(self, run: Future, clip_id: str, frames: np.ndarray, output: np.ndarray, metrics: dict[str, float],
               per_frame: dict[str, list[float]], per_sample: dict[str, list[float]],
               weights: dict[str, torch.Tensor], features: dict[str, np.ndarray]) -> None:
        """Encode the clip's videos and log them with its metrics (and adapted weights and FVD features,
        if any) in the background."""
        folder = Path(tempfile.mkdtemp(prefix="clip-videos-"))
        files = self.io.submit(write_clip_files, folder, frames, output, per_frame, self.data, weights, features)
        self.waiting.append(self.tracking.submit(self._log, run, clip_id, files, folder, metrics, per_frame,
                                                 per_sample))

    def fail(self, run: Future, clip_id: str, error: BaseException) -> None:
        self.waiting.append(self.tracking.submit(self._end, run, clip_id, error))

    def close(self) -> None:
        """Record every clip handed over (also when the stage is stopping), then drop the prefetch."""
        self.tracking.shutdown(wait=True)
        self.io.shutdown(wait=True, cancel_futures=True)

    def _log(self, run: Future, clip_id: str, files: Future, folder: Path, metrics: dict[str, float],
             per_frame: dict[str, list[float]], per_sample: dict[str, list[float]]) -> None:
        error = None
        try:
            run_id = run.result()
            timestamp = int(time.time() * 1000)
            history = [Metric(f"{name}_frame", value, timestamp, self.data.context + i)
                       for name, values in per_frame.items() for i, value in enumerate(values)]
            history += [Metric(f"{name}_sample", value, timestamp, n)
                        for name, values in per_sample.items() for n, value in enumerate(values)]
            metrics = {**metrics, "video_write_seconds": files.result()}
            client = MlflowClient()
            client.log_batch(run_id, metrics=[Metric(k, v, timestamp, 0) for k, v in metrics.items()] + history)
            client.log_artifacts(run_id, str(folder), artifact_path="clip")
        except Exception as exc:  # recorded on the clip's run; the stage goes on
            error = exc
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self._end(run, clip_id, error)

    def _end(self, run: Future, clip_id: str, error: BaseException | None) -> None:
        try:
            end_clip_run(run.result(), error)
        except Exception as exc:  # the run could not be created or ended: said here, counted as failed
            error = error or exc
        self.failures += error is not None
        self.on_end(clip_id, error)


def write_clip_files(folder: Path, frames: np.ndarray, output: np.ndarray, per_frame: dict[str, list[float]],
                     d: DataConfig, weights: dict[str, torch.Tensor], features: dict[str, np.ndarray]) -> float:
    """The files a clip's run keeps; returns the seconds it took."""
    start = time.perf_counter()
    write_video(folder / "context.mp4", frames[: d.context], d.fps)
    write_video(folder / "target.mp4", frames[d.context:], d.fps)
    write_video(folder / "output.mp4", output[d.context:], d.fps)  # the clip's first sample
    (folder / "frame_metrics.json").write_text(json.dumps({"first_frame": d.context, **per_frame}))
    if weights:
        save_file(weights, folder / "lora.safetensors")
    if features:
        np.savez(folder / FEATURES_FILE, **features)
    return time.perf_counter() - start
