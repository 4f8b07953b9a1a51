"""The LTX-Video backend against its reference, diffusers' LTXConditionPipeline, on a tiny random
checkpoint saved as a diffusers directory (the loading path users take for Lightricks/LTX-Video-0.9.5)."""
import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

from test_backend import tiny_latent_transformer, tiny_vae
from pipeline.models.base import frames_to_tensor
from pipeline.models.ltx_video import PROMPT_TOKENS, LTXVideoBackend

FRAMES, CONTEXT, SIZE, STEPS, SEED = 9, 5, 32, 4, 7


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "ball": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text_encoder = T5EncoderModel(T5Config(vocab_size=8, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    path = tmp_path_factory.mktemp("ltx-tiny")
    LTXConditionPipeline(FlowMatchEulerDiscreteScheduler(), tiny_vae(), text_encoder, tokenizer,
                         tiny_latent_transformer()).save_pretrained(path)
    return path


def test_from_pretrained_loads_a_diffusers_directory(checkpoint):
    backend = LTXVideoBackend.from_pretrained(str(checkpoint), prompt="a ball", fps=25.0, sampling_steps=2)
    embeds, mask = backend.prompt
    assert embeds.shape == (1, PROMPT_TOKENS, 32) and int(mask.sum()) == 2  # padded as the pipeline pads, masked
    assert (backend.temporal_ratio, backend.spatial_ratio) == (4, 4)
    latents = backend.sample(backend.encode(torch.zeros(1, 3, 5, 16, 16)), 3, seed=0)
    assert backend.decode(latents, torch.Generator().manual_seed(0)).shape == (1, 3, 9, 16, 16)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_baseline_equals_ltx_condition_pipeline(checkpoint, guidance):
    """Same seed and settings: our continuation of the context is the pipeline's latent output, with
    its defaults (posterior sample, context re-noising, linear-quadratic sigmas, causal video coords)."""
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    ours = LTXVideoBackend.from_pretrained(str(checkpoint), prompt="a ball", negative_prompt="", fps=25.0,
                                           sampling_steps=STEPS, guidance=guidance)
    layout = ours.frame_layout(FRAMES, CONTEXT, SIZE, SIZE)
    context = ours.encode(frames_to_tensor(frames[: layout.conditioned_pixel_frames]))
    continuation = ours.sample(context, layout.latent_frames, seed=SEED)

    pipe = LTXConditionPipeline.from_pretrained(checkpoint)
    reference = pipe(conditions=[LTXVideoCondition(video=[Image.fromarray(f) for f in frames[:CONTEXT]], frame_index=0)],
                     prompt="a ball", negative_prompt="", height=SIZE, width=SIZE, num_frames=FRAMES, frame_rate=25,
                     num_inference_steps=STEPS, guidance_scale=guidance, generator=torch.Generator().manual_seed(SEED),
                     output_type="latent").frames
    assert continuation.shape == reference.shape == (1, 8, layout.latent_frames, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(continuation, reference, atol=1e-5, rtol=1e-4)


def test_each_deviation_changes_the_continuation(checkpoint):
    """The labelled options are real deviations: each gives another continuation from the same seed."""
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)

    def continue_with(**options):
        backend = LTXVideoBackend.from_pretrained(str(checkpoint), prompt="a ball", fps=25.0, sampling_steps=STEPS,
                                                  **options)
        layout = backend.frame_layout(FRAMES, CONTEXT, SIZE, SIZE)
        context = backend.encode(frames_to_tensor(frames[: layout.conditioned_pixel_frames]))
        return backend.sample(context, layout.latent_frames, seed=SEED)
    reference = continue_with()
    for option in ({"cond_noise_scale": 0.0}, {"vae_posterior": "mode"}, {"schedule": "linear"}, {"guidance": 1.0}):
        assert not torch.allclose(continue_with(**option), reference, atol=1e-3), option


def test_prompt_dropout_trains_the_unconditional_branch(checkpoint):
    """adaptation.prompt_dropout: some samples of a batch see the negative prompt; 0 gives the prompt alone."""
    backend = LTXVideoBackend.from_pretrained(str(checkpoint), prompt="a ball", fps=25.0, prompt_dropout=0.5)
    embeds, mask = backend._training_prompt(64, torch.Generator().manual_seed(0))
    dropped = mask.sum(1) != int(backend.prompt[1].sum())  # "" has fewer tokens than "a ball"
    assert embeds.shape == (64, PROMPT_TOKENS, 32) and 10 < int(dropped.sum()) < 54
    assert torch.equal(embeds[dropped][0], backend.negative_prompt[0][0])
    assert torch.equal(embeds[~dropped][0], backend.prompt[0][0])
    backend.prompt_dropout = 0.0
    assert backend._training_prompt(64, torch.Generator()) == backend.prompt
