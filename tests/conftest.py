"""A tiny experiment shared by the tests: real mp4 clips, a real (tiny) LTX-Video transformer,
a real SQLite MLflow store per test."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.benchmarks.ltx_video import LTX_VIDEO_VAE

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"
TINY = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
            cross_attention_dim=32, num_layers=2, caption_channels=16)
# the LTX-Video VAE's architecture (blocks, down/upsampling, timestep conditioning) at a width a CPU runs quickly
NARROW_VAE = {**LTX_VIDEO_VAE, "block_out_channels": (8, 16, 32, 64, 128),
              "decoder_block_out_channels": (16, 32, 64), "layers_per_block": (1,) * 5,
              "decoder_layers_per_block": (1,) * 4}


def tiny_config(base: Path) -> dict:
    return {
        "experiment": "tiny",
        "data": {"output_dir": str(base / "data"), "frames": 6, "context": 3, "height": 16, "width": 16, "fps": 8,
                 "train_clips": 8, "test_clips": 3, "num_clips": 3},
        "model": {"weights": str(base / "tiny.safetensors"), "patch_size": 4, "layers": 1, "heads": 2,
                  "head_dim": 32},
        "pretrain": {"steps": 4, "batch_size": 4, "warmup": 1},
        "sampling": {"steps": 3},
        "adaptation": {"steps": 3, "rank": 4, "alpha": 4, "batch_size": 2, "warmup": 1},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def use_store(path: Path) -> str:
    uri = f"sqlite:///{path}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """Clips and pretrained tiny weights, made once per session through the real stages."""
    from pipeline.config import load_config
    from pipeline.stages.preprocess import run_preprocess
    from pipeline.stages.pretrain import pretrain

    base = tmp_path_factory.mktemp("prepared")
    use_store(base / "mlflow.db")
    config_path = write_config(base / "tiny.yaml", tiny_config(base))
    config = load_config(config_path)
    run_preprocess(config)
    pretrain(config)
    return config_path


@pytest.fixture
def store(tmp_path) -> str:
    """A fresh SQLite tracking store for one test (env var set, so subprocesses use it too)."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    uri = use_store(tmp_path / "mlflow.db")
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path):
    """A real `mlflow server` on loopback over the given store; yields its URI."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
                             str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.5)
    try:
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
