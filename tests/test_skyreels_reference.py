"""The SkyReels-V2 backend against its reference, diffusers' SkyReelsV2DiffusionForcingVideoToVideoPipeline,
on tiny random components with the prompt embeddings passed directly (no tokenizer or text encoder);
the loading path on a tiny diffusers directory with a tiny UMT5."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import SkyReelsV2DiffusionForcingVideoToVideoPipeline

from pipeline.adaptation import make_adapter
from pipeline.adaptation.trainer import adapt_to_clip
from pipeline.config import load_config
from pipeline.models import load_backend, reference_deviations
from pipeline.models.base import frames_to_tensor
from pipeline.models.skyreels_v2 import PROMPT_TOKENS, SkyReelsV2Backend

FRAMES, CONTEXT, SIZE, STEPS, SEED, FPS = 13, 7, 32, 4, 7, 24


@pytest.fixture(scope="module")
def backend() -> SkyReelsV2Backend:
    return SkyReelsV2Backend.small(fps=FPS, sampling_steps=STEPS)


@pytest.fixture(scope="module")
def clip() -> list[Image.Image]:
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    return [Image.fromarray(f) for f in frames]


def test_from_pretrained_loads_a_diffusers_directory(tmp_path, monkeypatch):
    """The loading path users take for Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers, on a tiny checkpoint
    with a tiny UMT5 (prompt cleaning, which needs ftfy, left out)."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing_v2v as v2v
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    monkeypatch.setattr("diffusers.utils.is_ftfy_available", lambda: True)
    monkeypatch.setattr(v2v, "prompt_clean", str.strip)
    words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "ball": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=8, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    tiny = SkyReelsV2Backend.small(fps=FPS)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    SkyReelsV2DiffusionForcingVideoToVideoPipeline(tokenizer, text_encoder, tiny.transformer, tiny.vae,
                                                   scheduler).save_pretrained(tmp_path)

    backend = SkyReelsV2Backend.from_pretrained(str(tmp_path), prompt="a ball", fps=FPS, sampling_steps=2,
                                                dtype=torch.bfloat16)
    assert backend.prompt.shape == (1, PROMPT_TOKENS, 32) and backend.prompt.dtype == torch.bfloat16
    assert backend.prompt[0, :2].abs().sum() > 0 and not backend.prompt[0, 2:].any()  # zeroed after its tokens
    assert not backend.negative_prompt.any()  # "" has no tokens
    assert backend.scheduler.config.flow_shift == 8.0 and backend.vae.dtype == torch.float32
    assert backend.transformer.dtype == torch.bfloat16
    latents = backend.sample(backend.encode(torch.zeros(1, 3, 5, 16, 16)), 3, seed=0)
    assert backend.decode(latents, torch.Generator()).shape == (1, 3, 9, 16, 16)


def reference_pipeline(backend: SkyReelsV2Backend) -> SkyReelsV2DiffusionForcingVideoToVideoPipeline:
    return SkyReelsV2DiffusionForcingVideoToVideoPipeline(tokenizer=None, text_encoder=None,
                                                          transformer=backend.transformer, vae=backend.vae,
                                                          scheduler=copy.deepcopy(backend.scheduler))


@pytest.mark.parametrize("dtype, guidance, same_prompt", [
    (torch.float32, 1.0, False), (torch.float32, 6.0, False), (torch.bfloat16, 6.0, False),
    (torch.float32, 6.0, True),  # we skip the unconditional pass, the pipeline makes it
])
def test_baseline_equals_the_v2v_pipeline_bitwise(clip, dtype, guidance, same_prompt):
    """Same seed and inputs: our continuation of the context is the pipeline's, latents and decoded
    video bit for bit (the pipeline's output repeats the input video before its decoded frames)."""
    backend = SkyReelsV2Backend.small(fps=FPS, sampling_steps=STEPS, guidance=guidance, dtype=dtype)
    if same_prompt:
        backend.negative_prompt = backend.prompt
    pipe = reference_pipeline(backend)
    layout = backend.frame_layout(FRAMES, CONTEXT, SIZE, SIZE)
    video = pipe.video_processor.preprocess_video(clip[:CONTEXT], height=SIZE, width=SIZE)
    latents = backend.sample(backend.encode(video[:, :, : layout.conditioned_pixel_frames]), layout.latent_frames,
                             SEED)
    ours = backend.decode(latents, torch.Generator().manual_seed(SEED)) * 0.5 + 0.5

    def reference(output_type: str) -> torch.Tensor:
        return pipe(video=clip[:CONTEXT], prompt_embeds=backend.prompt, negative_prompt_embeds=backend.negative_prompt,
                    height=SIZE, width=SIZE, num_frames=FRAMES, base_num_frames=FRAMES, overlap_history=CONTEXT,
                    num_inference_steps=STEPS, guidance_scale=guidance, fps=FPS, output_type=output_type,
                    generator=torch.Generator().manual_seed(SEED)).frames
    assert latents.shape == (1, 16, layout.latent_frames, SIZE // 8, SIZE // 8)
    assert torch.equal(latents, reference("latent"))
    decoded = reference("pt")[:, CONTEXT:].permute(0, 2, 1, 3, 4)
    assert ours.shape == decoded.shape == (1, 3, FRAMES, SIZE, SIZE)
    assert torch.equal(ours, decoded)


def test_guidance_and_seed_change_the_continuation(backend, clip):
    """The equality above could fail: another seed or guidance scale gives another continuation."""
    layout = backend.frame_layout(FRAMES, CONTEXT, SIZE, SIZE)
    context = backend.encode(frames_to_tensor(np.stack(clip[:layout.conditioned_pixel_frames])))
    backend.guidance = 6.0
    reference = backend.sample(context, layout.latent_frames, SEED)
    assert torch.equal(backend.sample(context, layout.latent_frames, SEED), reference)
    assert torch.equal(reference[:, :, :layout.latent_context], context)  # the prefix stays as given
    assert not torch.allclose(backend.sample(context, layout.latent_frames, SEED + 1), reference, atol=1e-3)
    backend.guidance = 1.0
    assert not torch.allclose(backend.sample(context, layout.latent_frames, SEED), reference, atol=1e-3)


def test_stage_pixels_match_the_pipelines_preprocessing_to_rounding(backend, clip):
    """The stages convert frames with frames_to_tensor (x / 127.5 - 1), the pipeline with x / 255 * 2 - 1."""
    pipe = reference_pipeline(backend)
    ours = frames_to_tensor(np.stack(clip))
    theirs = pipe.video_processor.preprocess_video(clip, height=SIZE, width=SIZE)
    torch.testing.assert_close(ours, theirs, atol=1.2e-7, rtol=0)


@pytest.mark.parametrize("frames, context, latent, latent_context, covered", [
    (13, 7, 4, 2, 5),  # pixel frames 5 and 6 are not covered by a whole latent frame
    (13, 9, 4, 3, 9),  # K = 4j+1: the prefix covers exactly the context
    (5, 1, 2, 1, 1),
])
def test_frame_layout_follows_the_wan_vae(backend, frames, context, latent, latent_context, covered):
    layout = backend.frame_layout(frames, context, 32, 48)
    assert (layout.latent_frames, layout.latent_context, layout.conditioned_pixel_frames) == (latent, latent_context,
                                                                                               covered)


def test_frame_rules_are_checked(backend):
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        backend.frame_layout(12, 5, 32, 32)
    with pytest.raises(ValueError, match="divisible by 16"):
        backend.frame_layout(13, 5, 32, 40)
    with pytest.raises(ValueError, match="0 < K < T"):
        backend.frame_layout(13, 13, 32, 32)


def test_encode_decode_shapes(backend):
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    latents = backend.encode(video)
    assert latents.shape == (1, 16, 3, 4, 6)
    decoded = backend.decode(latents, torch.Generator())
    assert decoded.shape == video.shape and decoded.abs().max() <= 1


def test_loss_ignores_the_clean_frames(backend):
    """The clean prefix is input, not target: changing the model's output there leaves the loss as it is."""
    latents = torch.randn(2, 16, 4, 4, 4)
    loss = backend.training_loss(latents, 2, torch.Generator().manual_seed(0))
    original = backend._velocity

    def altered(x, timestep, prompt):
        assert torch.equal(timestep[:, :2], torch.zeros_like(timestep[:, :2])) and (timestep[:, 2:] > 0).all()
        v = original(x, timestep, prompt).clone()
        v[:, :, :2] += 100
        return v
    backend._velocity = altered
    try:
        assert backend.training_loss(latents, 2, torch.Generator().manual_seed(0)) == loss
    finally:
        del backend._velocity
    assert torch.isfinite(loss) and backend.training_loss(latents, 1, torch.Generator().manual_seed(0)) != loss


def config(**overrides):
    return load_config(None, {"model.backend": "skyreels-v2", "data.frames": "13", "data.context": "7",
                              "data.height": "32", "data.width": "32", "sampling.steps": "3", "model.size": "tiny",
                              **overrides})


def test_zero_adaptation_steps_is_the_baseline_and_a_lora_step_trains():
    """Through the project's adaptation path: LoRA on the Wan blocks' attention and MLP, with gradient
    checkpointing; 0 steps reproduce the baseline bit for bit, one step moves it with a finite loss."""
    cfg = config(**{"adaptation.targets": "attention+mlp", "adaptation.steps": "0", "adaptation.lr": "0.05",
                    "adaptation.batch_size": "2", "model.gradient_checkpointing": "true"})
    backend = load_backend(cfg)
    assert isinstance(backend, SkyReelsV2Backend) and backend.transformer.gradient_checkpointing
    layout = backend.frame_layout(13, 7, 32, 32)
    context = backend.encode(torch.rand(1, 3, layout.conditioned_pixel_frames, 32, 32) * 2 - 1)
    baseline = backend.sample(context, layout.latent_frames, SEED)

    adapter = make_adapter(backend, cfg.adaptation)
    names = set(adapter.named_parameters())
    for module in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ffn.net.0.proj", "ffn.net.2"):
        assert f"blocks.1.{module}.lora_A.default.weight" in names, module
    stats = adapt_to_clip(backend, adapter, context, cfg.adaptation, seed=0)
    assert torch.equal(backend.sample(context, layout.latent_frames, SEED), baseline)

    cfg.adaptation.steps = 1
    stats = adapt_to_clip(backend, adapter, context, cfg.adaptation, seed=0)
    assert np.isfinite(stats["adapt_loss_first"])
    assert not torch.allclose(backend.sample(context, layout.latent_frames, SEED), baseline, atol=1e-4)
    adapter.reset()
    assert torch.equal(backend.sample(context, layout.latent_frames, SEED), baseline)


def test_guidance_other_than_the_pipelines_is_labelled():
    assert reference_deviations(config(**{"sampling.guidance": "6"})) == []
    assert reference_deviations(config(**{"sampling.guidance": "3"})) == ["guidance 3"]


def test_preset_conditions_on_exactly_the_context(backend):
    preset = load_config("conf/skyreels-v2.yaml")
    d = preset.data
    layout = backend.frame_layout(d.frames, d.context, d.height, d.width)
    assert (layout.latent_frames, layout.latent_context, layout.conditioned_pixel_frames) == (17, 9, d.context)
    assert reference_deviations(preset, trains=True) == []
