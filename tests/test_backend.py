import pytest
import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

from pipeline.models.ltx_video import LTXVideoBackend


def tiny_vae() -> AutoencoderKLLTXVideo:
    """diffusers' own tiny LTX-Video VAE test config: 4x time (causal first frame), 4x space."""
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return vae


def tiny_latent_transformer() -> LTXVideoTransformer3DModel:
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                      num_layers=1, caption_channels=32)


def pixel_backend(**kw) -> LTXVideoBackend:
    torch.manual_seed(0)
    return LTXVideoBackend.small(None, patch_size=4, layers=1, heads=2, head_dim=32, fps=8.0, sampling_steps=3, **kw)


def random_prompt(dim: int, tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, tokens, dim), torch.ones(1, tokens, dtype=torch.bool)


def vae_backend(**kw) -> LTXVideoBackend:
    torch.manual_seed(0)
    return LTXVideoBackend(tiny_latent_transformer(), tiny_vae(), FlowMatchEulerDiscreteScheduler(), random_prompt(32),
                           random_prompt(32), fps=25.0, sampling_steps=2, **kw)


def test_small_model_must_be_wider_than_a_patch():
    with pytest.raises(ValueError, match="must exceed the 192 values of a 8x8 RGB patch"):
        LTXVideoBackend.small(None, patch_size=8, layers=1, heads=4, head_dim=32, fps=8.0)


def test_pixel_space_layout_is_exact():
    layout = pixel_backend().frame_layout(16, 8, 32, 32)
    assert (layout.latent_frames, layout.latent_context, layout.conditioned_pixel_frames) == (16, 8, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        pixel_backend().frame_layout(16, 8, 30, 32)


@pytest.mark.parametrize("frames, context, latent, latent_context, covered", [
    (17, 5, 5, 2, 5),  # K = 4j+1: the prefix covers exactly the context
    (17, 8, 5, 2, 5),  # K = 8: pixel frames 5..7 are not covered by a whole latent frame
    (9, 1, 3, 1, 1),
])
def test_vae_layout_causal_first_frame(frames, context, latent, latent_context, covered):
    layout = vae_backend().frame_layout(frames, context, 32, 32)
    assert (layout.latent_frames, layout.latent_context, layout.conditioned_pixel_frames) == (latent, latent_context,
                                                                                               covered)


def test_vae_frame_rule_is_checked():
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        vae_backend().frame_layout(16, 5, 32, 32)


@pytest.mark.parametrize("make", [pixel_backend, vae_backend])
def test_clean_prefix_option_keeps_the_context(make):
    backend = make(cond_noise_scale=0.0, vae_posterior="mode")
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    layout = backend.frame_layout(9, 5, 32, 32)
    context = backend.encode(video[:, :, : layout.conditioned_pixel_frames])
    out = backend.sample(context, layout.latent_frames, seed=3)
    assert out.shape[2] == layout.latent_frames
    assert torch.equal(out[:, :, : layout.latent_context], backend.latents_from(context, torch.Generator()))


def test_posterior_draws_come_from_the_generator():
    backend = vae_backend()
    context = backend.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)
    draw = lambda seed: backend.latents_from(context, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    assert draw(0).shape[1] == context.shape[1] // 2 == 8  # mean and log-variance in, latents out


def test_loss_ignores_clean_tokens():
    backend = pixel_backend()
    latents = torch.rand(2, 3, 6, 16, 16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    loss = backend.training_loss(latents, clean_frames=3, generator=g())
    changed = latents.clone()
    changed[:, :, 3:] += 1  # the target frames change: the loss must change
    assert backend.training_loss(changed, 3, g()) != loss


def test_noise_level_draw_is_ltx_video_trainers_by_default():
    """adaptation.timesteps=model: the logit-normal mean grows with the token count (LTX-Video-Trainer's
    shifted logit-normal); logit_normal keeps it at 0. Same generator, different loss."""
    model, plain = pixel_backend(timesteps="model"), pixel_backend(timesteps="logit_normal")
    assert (model._sigma_shift(1024), model._sigma_shift(4096), plain._sigma_shift(4096)) == (0.95, 2.05, 0.0)
    latents = torch.rand(2, 3, 6, 16, 16)
    losses = [b.training_loss(latents, 3, torch.Generator().manual_seed(0)) for b in (model, plain)]
    assert losses[0] != losses[1]


def test_compiled_blocks_match_eager_and_compile_once_for_all_blocks():
    """model.compile: one graph serves every transformer block, with and without gradient checkpointing
    (then the checkpoint sits inside the compiled region); same velocities and gradients as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backends = []
    for compile, checkpointing in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        backends.append(LTXVideoBackend.small(None, patch_size=4, layers=3, heads=2, head_dim=32, fps=8.0,
                                              sampling_steps=2, compile=compile))
        if checkpointing:
            backends[-1].enable_gradient_checkpointing()
    context = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    eager, compiled, _ = (b.sample(context, 4, seed=0) for b in backends)
    assert counters["stats"]["unique_graphs"] == 1  # three blocks, one compiled graph
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    grads, graphs = [], []
    for backend in backends:
        backend.transformer.requires_grad_(True)
        before = counters["stats"]["unique_graphs"]
        backend.training_loss(context, 1, torch.Generator().manual_seed(0)).backward()
        graphs.append(counters["stats"]["unique_graphs"] - before)
        grads.append(backend.transformer.transformer_blocks[1].attn1.to_q.weight.grad)
    assert graphs == [0, 1, 1]  # the training graph, again one for all three blocks
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-4, rtol=1e-3)


def test_compiled_blocks_take_the_batched_lora_of_clips_adapted_together():
    """model.compile with sampling.clips_per_batch: the batched LoRA layers inside the compiled blocks
    train and sample as in eager mode, and a group with fewer clips (one failed) compiles its own
    batch size without changing the answer."""
    from torch._dynamo.utils import counters

    from pipeline.adaptation.batched_lora import BatchedLora
    from pipeline.adaptation.trainer import adapt_clips_together
    from pipeline.config import load_config

    config = load_config(None, {"adaptation.steps": "2", "adaptation.lr": "0.01", "adaptation.batch_size": "1",
                                "adaptation.rank": "4"}).adaptation
    contexts = [torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(2)]
    results = []
    for compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        backend = LTXVideoBackend.small(None, patch_size=4, layers=2, heads=2, head_dim=32, fps=8.0, sampling_steps=2,
                                        compile=compile)
        lora = BatchedLora(backend, config, clips=2)
        fits = adapt_clips_together(backend, lora, contexts, config, seeds=[5, 6])
        with lora.route([0, 1], items_per_clip=1):
            both = backend.sample_batch(torch.cat(contexts), 4, [1, 2])
        with lora.route([1], items_per_clip=1):
            second = backend.sample_batch(contexts[1], 4, [2])
        results.append((both, second, [fit["adapt_loss_last"] for fit in fits]))
    assert counters["stats"]["unique_graphs"] > 0  # the compiled run did compile
    (eager, eager_second, eager_losses), (compiled, compiled_second, compiled_losses) = results
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_second, eager_second, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_second, compiled[1:], atol=1e-5, rtol=1e-5)  # slot 1, whatever the group
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert not torch.allclose(compiled[0], compiled[1], atol=1e-3)


@pytest.mark.parametrize("make", [pixel_backend, vae_backend])
def test_a_batch_of_contexts_and_seeds_samples_as_one_call_per_pair(make):
    """Each continuation of a batch comes from its own generator (posterior draw, initial noise, the
    context re-noised at every step, both guidance branches), so one batch equals one call per
    context and seed up to float rounding."""
    backend = make()  # the reference settings: posterior sampled, context re-noised, guidance 3
    layout = backend.frame_layout(9, 5, 32, 32)
    clips = torch.rand(2, 3, layout.conditioned_pixel_frames, 32, 32) * 2 - 1
    contexts = torch.cat([backend.encode(clip[None]) for clip in clips])[[0, 0, 1]]  # one clip twice, another
    seeds = [3, 4, 3]
    batched = backend.sample_batch(contexts, layout.latent_frames, seeds)
    one_by_one = torch.cat([backend.sample(c[None], layout.latent_frames, s) for c, s in zip(contexts, seeds)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)  # another seed, another continuation
    with pytest.raises(ValueError, match="one seed per context"):
        backend.sample_batch(contexts, layout.latent_frames, seeds[:2])
