"""Reading and writing video files with PyAV. Frames are uint8 arrays of shape (T, H, W, 3).

Clips are stored losslessly and intra-only (`write_clip`: FFV1 in Matroska, every frame a keyframe),
so a decoded frame depends on that frame alone: no context frame can carry information from the
target frames through the codec, and the same frames always give the same bytes. H.264
(`write_video`) is for people only: the viewer and the clips' MLflow artifacts.
"""
from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class VideoError(ValueError):
    """A video file that cannot be used, with the file and the reason in the message."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode up to `max_frames` RGB frames and return them with the stream's frame rate."""
    path = Path(path)
    if not path.exists():
        raise VideoError(path, "file does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream in file")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(path, f"not a readable video ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise VideoError(path, "no decodable frames")
    return np.stack(frames), fps


def frames_hash(frames: np.ndarray) -> str:
    """The content hash of a clip's decoded frames (shape and every pixel)."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    return hashlib.sha256(repr(frames.shape).encode() + frames.tobytes()).hexdigest()[:16]


def write_clip(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Store (T, H, W, 3) uint8 frames losslessly, each frame coded on its own (FFV1, .mkv), with
    byte-identical output for identical frames (the muxer's bitexact mode writes no time or random ids)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    tmp = path.with_name(path.name + ".partial.mkv")
    with av.open(str(tmp), mode="w", format="matroska", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=_fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0"  # FFV1's 8-bit RGB: lossless for rgb24 frames
        stream.codec_context.gop_size = 1  # every frame a keyframe: coder state never carries over
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)
    return path


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 12) -> Path:
    """Encode (T, H, W, 3) uint8 frames as H.264 mp4 (yuv420p, playable in browsers): lossy, for viewing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    _, height, width, _ = frames.shape
    tmp = path.with_name(path.name + ".partial.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=_fraction(fps))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}  # half the encoding time of x264's default
        for image in frames:
            if width % 2 or height % 2:
                image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)  # a crash never leaves a half-written file under the final name
    return path


def _fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)
