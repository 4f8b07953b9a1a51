import av
import numpy as np
import pytest

from conftest import REAL_DATA
from pipeline.data.video_io import VideoError, frames_hash, read_video, write_clip, write_video


def test_round_trip_keeps_frames_size_and_fps(tmp_path):
    frames = np.zeros((9, 32, 48, 3), np.uint8)
    frames[:, 8:24, 8:24] = np.linspace(0, 255, 9, dtype=np.uint8)[:, None, None, None]
    path = write_video(tmp_path / "clip.mp4", frames, fps=12)
    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape and fps == pytest.approx(12)
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # lossy, but close
    assert not list(tmp_path.glob("*.partial*"))


def test_clips_are_lossless_intra_only_and_byte_deterministic(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (7, 20, 33, 3), np.uint8)  # odd width too
    first = write_clip(tmp_path / "a.mkv", frames, fps=29.97)
    second = write_clip(tmp_path / "b.mkv", frames, fps=29.97)
    assert first.read_bytes() == second.read_bytes()
    decoded, fps = read_video(first)
    assert np.array_equal(decoded, frames) and fps == pytest.approx(29.97, abs=1e-2)
    assert frames_hash(decoded) == frames_hash(frames) != frames_hash(frames[:-1])
    with av.open(str(first)) as container:
        assert all(packet.is_keyframe for packet in container.demux(video=0) if packet.size)


@pytest.mark.parametrize("content, reason", [
    (None, "file does not exist"),
    (b"this is not a video at all", "not a readable video"),
    (b"\x00\x00\x00\x18ftypmp42" + bytes(300), "not a readable video"),  # corrupt mp4 header
])
def test_unusable_files_name_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoError) as err:
        read_video(path)
    assert str(path) in str(err.value) and reason in str(err.value)


@pytest.mark.skipif(not REAL_DATA.exists(), reason="../shared/data/real is absent (only in the project's workspace)")
@pytest.mark.parametrize("name, size", [("ucf101_ApplyEyeMakeup_sample.avi", (240, 320)),
                                        ("kinetics_sample_a.mp4", (256, 340))])
def test_real_clips_decode(name, size):
    frames, fps = read_video(REAL_DATA / name, max_frames=20)
    assert frames.shape == (20, *size, 3) and fps > 20
