"""Each clip's context latents, VAE-encoded once and shared by the baseline and every adapted arm.

Files live under `<data.output_dir>/latents/<key>/<clip id>-<content hash>.safetensors`: the folder's
key covers the encoding's format and backend, the pixel frames encoded, the VAE's dtype and a
fingerprint of its weights (so a different or retrained VAE never reads another one's encodings),
the name the clip's content (so a clip changed by preprocessing is encoded again). Writes go through
a temporary file and a rename, so concurrent tasks and killed runs leave only whole files.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config
from .base import VideoBackend, weights_fingerprint


# what `VideoBackend.encode` returns; raised when that changes, so no older file is read with a new meaning
# (2: LTX-Video caches the VAE posterior's parameters, no longer its mode)
ENCODING_FORMAT = 2


class LatentCache:
    def __init__(self, folder: Path | None):
        self.folder = folder  # None: encode every time

    @classmethod
    def for_stage(cls, config: Config, backend: VideoBackend, conditioned_pixel_frames: int) -> LatentCache:
        """Off when model.cache_latents is false or the backend has no VAE (nothing costly to save)."""
        if not config.model.cache_latents or backend.vae is None:
            return cls(None)
        key = json.dumps([ENCODING_FORMAT, type(backend).__name__, conditioned_pixel_frames, str(backend.dtype),
                          weights_fingerprint(backend.vae)])
        return cls(Path(config.data.output_dir) / "latents" / hashlib.sha256(key.encode()).hexdigest()[:16])

    def context(self, clip_id: str, content_hash: str, encode: Callable[[], torch.Tensor],
                device: torch.device) -> tuple[torch.Tensor, bool]:
        """The clip's context latents and whether they came from the cache."""
        if self.folder is None:
            return encode(), False
        path = self.folder / f"{clip_id}-{content_hash}.safetensors"
        if path.exists():
            try:
                return load_file(path, device=str(device))["latents"], True
            except Exception as exc:  # damaged outside this program: encode again and replace it
                print(f"latent cache: {path} unreadable ({exc}); encoding the context again", file=sys.stderr)
        latents = encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file({"latents": latents.detach().contiguous().cpu()}, partial)
        os.replace(partial, path)
        return latents, False
