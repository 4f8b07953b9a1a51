"""Clip I/O off the GPU's critical path: the next clip is decoded and the last clip's videos are
encoded on worker threads while the model works on the current clip.

A clip's run is FINISHED only once its videos are logged, so a stage killed meanwhile leaves it
RUNNING and the clip is redone on resume. MLflow is called from the main thread only.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from ..config import DataConfig
from ..data.video_io import write_video
from ..tracking.runs import end_clip_run


class Recorder:
    def __init__(self, data: DataConfig, on_end: Callable[[str, BaseException | None], None], workers: int = 2):
        self.data, self.on_end = data, on_end  # on_end(clip id, error or None) once a clip's run has ended
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-io")
        self.pending: list[tuple[str, str, Future, Path]] = []  # clip id, run id, videos written, folder

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    def write(self, clip_id: str, run_id: str, frames: np.ndarray, output: np.ndarray,
              per_frame: dict[str, list[float]]) -> None:
        """Encode the clip's context, target and output videos in the background."""
        folder = Path(tempfile.mkdtemp(prefix="clip-videos-"))
        written = self.pool.submit(write_clip_videos, folder, frames, output, per_frame, self.data)
        self.pending.append((clip_id, run_id, written, folder))

    def finish(self) -> None:
        """Log every written clip's videos and end its run."""
        client = MlflowClient()
        while self.pending:
            clip_id, run_id, written, folder = self.pending[0]
            try:
                client.log_metric(run_id, "video_write_seconds", written.result())
                client.log_artifacts(run_id, str(folder), artifact_path="clip")
                error = None
            except Exception as exc:  # recorded on the clip's run; the stage goes on
                error = exc
            end_clip_run(run_id, error)
            shutil.rmtree(folder, ignore_errors=True)
            self.pending.pop(0)
            self.on_end(clip_id, error)

    def close(self) -> None:
        self.finish()
        self.pool.shutdown(wait=True, cancel_futures=True)


def write_clip_videos(folder: Path, frames: np.ndarray, output: np.ndarray, per_frame: dict[str, list[float]],
                      d: DataConfig) -> float:
    """The files a clip's run keeps; returns the seconds it took."""
    start = time.perf_counter()
    write_video(folder / "context.mp4", frames[: d.context], d.fps)
    write_video(folder / "target.mp4", frames[d.context:], d.fps)
    write_video(folder / "output.mp4", output[d.context:], d.fps)
    (folder / "frame_metrics.json").write_text(json.dumps({"first_frame": d.context, **per_frame}))
    return time.perf_counter() - start
