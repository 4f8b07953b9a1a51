"""Model backends, one per model family, behind `VideoBackend`.

A new backend: its module (a `VideoBackend` subclass with `from_config`) and one line in BACKENDS;
its name in config.CHOICES and its options beside the others in config.py (tests/test_config.py
checks that the names agree).
"""
from __future__ import annotations

from ..config import Config
from .base import FrameLayout, VideoBackend, default_device
from .ltx_video import LTXVideoBackend
from .opensora_v13 import OpenSoraV13Backend
from .opensora_v20 import OpenSoraV20Backend
from .skyreels_v2 import SkyReelsV2Backend

__all__ = ["BACKENDS", "FrameLayout", "VideoBackend", "load_backend", "default_device", "reference_deviations"]

BACKENDS: dict[str, type[VideoBackend]] = {
    "ltx-video": LTXVideoBackend,
    "opensora-v1.3": OpenSoraV13Backend,
    "opensora-v2.0": OpenSoraV20Backend,
    "skyreels-v2": SkyReelsV2Backend,
}


def load_backend(config: Config, random_weights: bool = False) -> VideoBackend:
    """The backend named by `config.model.backend`; with `random_weights` the untrained model that
    pretraining starts from."""
    backend_class = BACKENDS[config.model.backend]
    backend = backend_class.untrained(config) if random_weights else backend_class.from_config(config)
    if config.model.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    return backend


def reference_deviations(config: Config, trains: bool = False) -> list[str]:
    """Where the configured sampler (and for an arm that trains weights its loss) departs from the
    backend's reference, in words for arm labels (the settings themselves are params and part of every
    result's key)."""
    deviations = BACKENDS[config.model.backend].reference_deviations(config)
    if trains and config.adaptation.timesteps != "model":
        deviations.append("plain logit-normal t")
    return deviations
