"""The contract every registered backend keeps, checked with a tiny config of its own: the frame
layout, encode/decode shapes, 0 adaptation steps equal to the baseline bit for bit and a reset that
restores every weight (for every method that trains weights), a finite loss, sampling deterministic
under a seed, a batch sampled as one call per context and seed, several clips adapted together as
each alone (where the backend batches clips), and a starting noise that replaces the seed's own
exactly where the backend takes one. A backend whose package is not installed here is skipped with
the reason. Each backend's own test file keeps only what is specific to it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.adaptation import METHODS, make_adapter
from pipeline.adaptation.base import WeightAdapter
from pipeline.adaptation.batched_lora import BatchedLora
from pipeline.adaptation.trainer import adapt_clips_together, adapt_to_clip
from pipeline.config import Config, load_config
from pipeline.models import BACKENDS, VideoBackend
from pipeline.models.base import PackageMissing
from pipeline.stages.pretrain import train_weights

CLIP = {"data.height": "32", "data.width": "32", "data.fps": "24", "sampling.steps": "2", "model.dtype": "float32",
        "adaptation.rank": "2", "adaptation.alpha": "2", "adaptation.batch_size": "1", "adaptation.warmup": "1"}
# per backend: a tiny model with random weights, and a clip length it takes in whole latent frames
TINY = {
    "ltx-video": {"data.frames": "9", "data.context": "5", "model.patch_size": "4", "model.layers": "1",
                  "model.heads": "2", "model.head_dim": "32"},
    "opensora-v1.3": {"data.frames": "17", "data.context": "8", "model.size": "tiny", "model.portable_kernels": "true"},
    "opensora-v2.0": {"data.frames": "17", "data.context": "9", "model.size": "tiny", "model.portable_kernels": "true"},
    "skyreels-v2": {"data.frames": "9", "data.context": "5", "model.size": "tiny"},
}


def test_every_registered_backend_has_a_tiny_config():
    assert set(TINY) == set(BACKENDS)


@dataclasses.dataclass
class Case:
    config: Config
    backend: VideoBackend
    video: torch.Tensor  # (1, 3, T, H, W) in [-1, 1]

    def context(self) -> torch.Tensor:
        d = self.config.data
        layout = self.backend.frame_layout(d.frames, d.context, d.height, d.width)
        return self.backend.encode(self.video[:, :, : layout.conditioned_pixel_frames])

    def sample(self, seed: int = 3) -> torch.Tensor:
        d = self.config.data
        layout = self.backend.frame_layout(d.frames, d.context, d.height, d.width)
        return self.backend.sample(self.context(), layout.latent_frames, seed)


def tiny_config(name: str, weights: Path, **overrides: str) -> Config:
    config = load_config(None, {"model.backend": name, **CLIP, **TINY[name], **overrides})
    if BACKENDS[name].can_pretrain:  # its from_config loads the weights that pretraining writes
        trainer = config.with_setting("pretrain.steps", 0).with_setting("pretrain.batch_size", 1)
        if not weights.exists():
            d = config.data
            train_weights(trainer, weights, torch.zeros(1, d.frames, d.height, d.width, 3, dtype=torch.uint8))
        config = config.with_setting("model.weights", str(weights))
    return config


@pytest.fixture(params=list(BACKENDS))
def make_case(request, tmp_path_factory):
    """case(**overrides): the backend `request.param` built through its from_config, with a clip."""
    weights = tmp_path_factory.getbasetemp() / f"contract-{request.param}.safetensors"

    def case(**overrides: str) -> Case:
        config = tiny_config(request.param, weights, **overrides)
        torch.manual_seed(0)
        try:
            backend = BACKENDS[request.param].from_config(config)
        except PackageMissing as exc:
            pytest.skip(f"{request.param}: {exc}")
        d = config.data
        video = torch.rand(1, 3, d.frames, d.height, d.width, generator=torch.Generator().manual_seed(1)) * 2 - 1
        return Case(config, backend, video)

    return case


def test_frame_layout_maps_the_clip_and_names_a_bad_one(make_case):
    case = make_case()
    d, backend = case.config.data, case.backend
    layout = backend.frame_layout(d.frames, d.context, d.height, d.width)
    assert (layout.frames, layout.context) == (d.frames, d.context)
    assert 0 < layout.latent_context < layout.latent_frames
    assert 0 < layout.conditioned_pixel_frames <= d.context
    assert backend.latents_from(case.context(), torch.Generator()).shape[2] == layout.latent_context
    with pytest.raises(ValueError, match="0 < K < T"):
        backend.frame_layout(d.frames, d.frames, d.height, d.width)  # no frame left to continue


def test_encode_decode_round_trip_keeps_the_clip_shape(make_case):
    """A clip's latents decode to at least its T frames at its size (the stages cut what is more), and
    so do the sampled latents; the context's latents are the clip's first latent frames in shape."""
    case = make_case()
    backend, generator, frames = case.backend, torch.Generator().manual_seed(0), case.config.data.frames
    latents = backend.latents_from(backend.encode(case.video), generator)
    context = backend.latents_from(case.context(), generator)
    assert (latents.shape[:2], latents.shape[3:]) == (context.shape[:2], context.shape[3:])
    for decoded in (backend.decode(latents, generator), backend.decode(case.sample(), generator)):
        assert decoded[:, :, :frames].shape == case.video.shape and decoded.abs().max() <= 1


WEIGHT_METHODS = [name for name, method in METHODS.items() if issubclass(method, WeightAdapter)]


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_zero_adaptation_steps_sample_the_baseline_bitwise(make_case, method):
    case = make_case(**{"adaptation.method": method, "adaptation.steps": "0"})
    baseline = case.sample()
    adapter = make_adapter(case.backend, case.config.adaptation)
    adapt_to_clip(case.backend, adapter, case.context(), case.config.adaptation, seed=0)
    assert len(adapter.parameters()) > 0
    assert torch.equal(case.sample(), baseline)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_reset_restores_every_weight(make_case, method):
    case = make_case(**{"adaptation.method": method, "adaptation.steps": "2", "adaptation.lr": "0.01",
                        "adaptation.objective": "denoising"})
    transformer = case.backend.transformer
    baseline = case.sample()
    adapter = make_adapter(case.backend, case.config.adaptation)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    adapt_to_clip(case.backend, adapter, case.backend.encode(case.video), case.config.adaptation, seed=0)
    assert any(not torch.equal(v, before[k]) for k, v in transformer.state_dict().items()), "nothing trained"
    assert not torch.equal(case.sample(), baseline)  # the adapted model continues differently
    assert set(adapter.state_dict()) == {n for n, p in transformer.named_parameters() if p.requires_grad}
    adapter.reset()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
    assert torch.equal(case.sample(), baseline)


@pytest.mark.parametrize("clean_frames", [0, 1])
def test_training_loss_is_finite_and_reaches_the_weights(make_case, clean_frames):
    case = make_case()
    backend = case.backend
    backend.transformer.requires_grad_(True)
    loss = backend.training_loss(backend.encode(case.video), clean_frames, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in backend.transformer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_sampling_is_deterministic_under_a_seed(make_case):
    case = make_case()
    first = case.sample(seed=3)
    assert torch.equal(case.sample(seed=3), first)
    assert not torch.equal(case.sample(seed=4), first)


def test_a_given_starting_noise_replaces_the_seeds_own_or_the_noise_methods_refuse(make_case):
    case = make_case(**{"adaptation.method": "select"})
    backend, d = case.backend, case.config.data
    if not backend.takes_noise:
        with pytest.raises(ValueError, match="chooses the sampler's starting noise"):
            make_adapter(backend, case.config.adaptation)
        return
    frames = backend.frame_layout(d.frames, d.context, d.height, d.width).latent_frames
    contexts, seeds = case.context().expand(2, *case.context().shape[1:]), [5, 6]
    own = backend.draw_noise(contexts, frames, seeds)
    assert torch.equal(backend.sample_batch(contexts, frames, seeds, noise=own), backend.sample_batch(contexts, frames, seeds))
    assert not torch.equal(backend.sample_batch(contexts, frames, seeds, noise=backend.draw_noise(contexts, frames, [7, 8])),
                           backend.sample_batch(contexts, frames, seeds))


def test_a_batch_samples_each_context_as_its_own_seed_does(make_case):
    """sample_batch, the stages' path (a clip's samples and clips sampled together in one batch),
    gives continuation i what `sample` gives context i under seeds[i], up to float rounding."""
    case = make_case(**{"sampling.guidance": "3"})  # where the backend guides, its branches batch too
    backend, d = case.backend, case.config.data
    frames = backend.frame_layout(d.frames, d.context, d.height, d.width).latent_frames
    context = case.context()
    contexts, seeds = torch.cat([context, context.flip(-1)]), [3, 5]
    batched = backend.sample_batch(contexts, frames, seeds)
    alone = torch.cat([backend.sample(c[None], frames, s) for c, s in zip(contexts, seeds)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # each its own context and seed


def test_clips_trained_together_lose_what_each_loses_alone(make_case):
    """Backends that batch clips (sampling.clips_per_batch) give each clip of a `training_losses` call
    its own `training_loss`, drawn from its own generator; the others say they train one at a time."""
    case = make_case()
    backend = case.backend
    latents = [backend.encode(case.video), backend.encode(case.video.flip(-1))]
    generators = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    if not backend.batches_clips:
        with pytest.raises(NotImplementedError, match="one clip at a time"):
            backend.training_losses(latents, [1, 0], generators())
        return
    together = backend.training_losses(latents, [1, 0], generators())
    alone = torch.stack([backend.training_loss(x, c, g) for x, c, g in zip(latents, [1, 0], generators())])
    assert together.shape == (2,) and torch.isfinite(together).all()
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
    assert together[0] != together[1]


def test_clips_adapted_together_continue_as_each_adapted_alone(make_case):
    """sampling.clips_per_batch on backends that batch clips: two clips, each its own LoRA slot, adapted
    and then sampled in one batch (two samples each, guided where the backend guides), give what each
    gives with its own adapter alone, up to float rounding."""
    settings = {"adaptation.method": "lora", "adaptation.steps": "2", "adaptation.lr": "0.01", "sampling.guidance": "3"}
    case = make_case(**settings)
    backend, d, cfg = case.backend, case.config.data, case.config.adaptation
    if not backend.batches_clips:
        pytest.skip(f"{case.config.model.backend} adapts one clip at a time")
    frames = backend.frame_layout(d.frames, d.context, d.height, d.width).latent_frames
    contexts = [case.context(), case.context().flip(-1)]
    together = BatchedLora(backend, cfg, clips=2)
    fits = adapt_clips_together(backend, together, contexts, cfg, seeds=[11, 12])
    with together.route([0, 1], items_per_clip=2):
        samples = backend.sample_batch(torch.cat([c.expand(2, -1, -1, -1, -1) for c in contexts]), frames, [1, 2, 3, 4])
    backend = make_case(**settings).backend  # the same model, without the batched layers
    for i, context in enumerate(contexts):
        adapter = make_adapter(backend, cfg)
        fit = adapt_to_clip(backend, adapter, context, cfg, seed=11 + i)
        alone = backend.sample_batch(context.expand(2, -1, -1, -1, -1), frames, [1 + 2 * i, 2 + 2 * i])
        assert fits[i]["adapt_loss_last"] == pytest.approx(fit["adapt_loss_last"], rel=1e-4)
        torch.testing.assert_close(samples[2 * i:2 * i + 2], alone, rtol=1e-4, atol=1e-4)
        adapter.reset()
    assert not torch.allclose(samples[0], samples[2], atol=1e-3)
