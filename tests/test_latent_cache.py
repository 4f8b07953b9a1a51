"""The context-latent cache: encoded once per clip, keyed on the VAE's weights, whole files only."""
import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

from conftest import NARROW_VAE, TINY
from pipeline.config import load_config
from pipeline.models.ltx_video import LTXVideoBackend
from pipeline.models.latent_cache import LatentCache


def narrow_backend() -> LTXVideoBackend:
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(**{**TINY, "in_channels": 128, "out_channels": 128})
    prompt = torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool)
    return LTXVideoBackend(transformer, AutoencoderKLLTXVideo(**NARROW_VAE), FlowMatchEulerDiscreteScheduler(), prompt,
                           prompt, fps=25.0)


def test_context_is_encoded_once_then_read_back(tmp_path):
    backend = narrow_backend()
    config = load_config(None, {"data.output_dir": str(tmp_path)})
    cache = LatentCache.for_stage(config, backend, 9)
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    calls = []

    def encode():
        calls.append(1)
        return backend.encode(video)

    first, cached_first = cache.context("clip_a", "hash1", encode, backend.device)
    again, cached_again = LatentCache.for_stage(config, backend, 9).context("clip_a", "hash1", encode,
                                                                            backend.device)
    assert (cached_first, cached_again, len(calls)) == (False, True, 1)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert [p.name for p in cache.folder.iterdir()] == ["clip_a-hash1.safetensors"]  # no partial file left
    (cache.folder / "clip_a-hash1.safetensors").write_bytes(b"damaged")
    repaired, cached = cache.context("clip_a", "hash1", encode, backend.device)
    assert not cached and len(calls) == 2
    torch.testing.assert_close(repaired, first, atol=0, rtol=0)
    assert cache.context("clip_a", "hash1", encode, backend.device)[1]  # the file was replaced
    assert not cache.context("clip_a", "hash2", encode, backend.device)[1]  # the clip's content changed


def test_another_vae_or_layout_gets_its_own_cache_and_pixels_none(tmp_path):
    backend = narrow_backend()
    config = load_config(None, {"data.output_dir": str(tmp_path)})
    folder = LatentCache.for_stage(config, backend, 9).folder
    assert LatentCache.for_stage(config, backend, 17).folder != folder  # other frames encoded
    with torch.no_grad():
        next(backend.vae.parameters()).view(-1)[0] += 1e-3  # a retrained VAE at the same path
    assert LatentCache.for_stage(config, backend, 9).folder != folder
    off = load_config(None, {"data.output_dir": str(tmp_path), "model.cache_latents": "false"})
    assert LatentCache.for_stage(off, backend, 9).folder is None
    backend.vae = None  # the pixel-space default: nothing to cache
    assert LatentCache.for_stage(config, backend, 9).folder is None


def test_vae_reconstruction_is_scored_as_the_ceiling_of_a_latent_model(tmp_path):
    """With a VAE, the baseline stage scores the target encoded and decoded by that VAE."""
    import numpy as np

    from pipeline.data.manifest import ClipRecord
    from pipeline.evaluation.metrics import frame_metrics
    from pipeline.models.base import frames_to_tensor, tensor_to_frames
    from pipeline.seeds import derive_seed
    from pipeline.stages.continuation import ClipFrames, Continuer

    backend = narrow_backend()
    config = load_config(None, {"data.output_dir": str(tmp_path), "data.frames": "9", "data.context": "5",
                                "data.height": "64", "data.width": "64", "sampling.steps": "2",
                                "evaluation.lpips": "false"})
    frames = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), np.uint8)
    out = Continuer(config, "baseline", backend).run(ClipFrames(ClipRecord("c", "x", "", 9, 8.0, 64, 64, "test", "",
                                                                           content_hash="h"), frames))
    seed = derive_seed(config.sampling.seed, "vae_recon")
    latents = backend.latents_from(backend.encode(frames_to_tensor(frames)), torch.Generator().manual_seed(seed))
    recon = tensor_to_frames(backend.decode(latents, torch.Generator().manual_seed(seed)))[5:]
    assert out.per_frame["vae_recon_psnr"] == frame_metrics(recon, frames[5:])["psnr"]
    assert out.metrics["vae_recon_psnr"] > 0 and "repeat_last_psnr" in out.metrics
