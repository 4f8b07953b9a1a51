"""Open-Sora v1.3 (STDiT3 + OpenSoraVAE_V1_3 + T5) through the upstream `opensora` package.

Latent alignment. The v1.3 VAE encodes 17-frame chunks that overlap by one frame (chunk c covers
pixel frames 16c..16c+16) into 5 latent frames each: the first latent frame of a chunk is its first
pixel frame alone, each further one 4 frames. A clip of 16n+1 frames is 5n latent frames. A context
of K pixel frames is encoded as the longest prefix whose latent frames it covers completely: K=8 ->
2 latent frames = pixel frames [0, 5). Clips whose length is not 16n+1 are generated at the next
16n+1 and cut to T (T=45 -> 15 latent frames, 49 decoded frames, the first 45 kept).

Upstream's `condition_frame_length` counts LATENT frames (`prep_ref_and_mask` in
opensora/utils/inference_utils.py), so `condition_frame_length=8` conditions on 8 latent frames,
about 29 pixel frames, not 8. Here the clean prefix is derived from K pixel frames instead.

Conditioning (`model.conditioning`):
- `reference` (the default), upstream's v2v_head path as released. Sampling is `RFLOW.sample` as
  `configs/opensora-v1-3/inference/v2v.py` runs it: no `x_mask`, the reference latents through
  `x_embedder_cond`/`cond_mask`, SDEdit re-noising of the condition frames to the current noise
  level at every step, oscillation guidance on text and image, the image weight ramped over frames
  and steps (`scale_image_weight`), nothing put back after the last step. The adaptation loss is
  `RFlowScheduler.training_losses` with `mask_index` = the clean frames: every frame noised and in
  the loss, the conditions dropped at `adapt_i2v.py`'s rates. A prompt gets the aesthetic-score
  suffix of the inference config.
- `clean_prefix`: the prefix enters as the v2v condition AND stays clean (timestep 0 through
  `x_mask`, put back after every step), constant guidance, and the loss covers only the noised
  frames.
tests/test_opensora_upstream.py checks both reference paths against upstream's own functions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..config import Config
from .base import FrameLayout, check_context, compile_blocks, draw_per_generator, flow_noised
from .upstream import OpenSoraBackend, oscillation_scale, require_opensora

CHUNK, CHUNK_LATENTS = 17, 5  # pixel frames per VAE chunk (overlapping by one) and their latent frames
SPATIAL = 8
PATCH = (1, 2, 2)
AESTHETIC_SCORE = 7.0  # configs/opensora-v1-3/inference/v2v.py: aes
# configs/opensora-v1-3/train/adapt_i2v.py: drop_condition, one draw per batch
DROP_CONDITION = {"keep": 0.85, "cond": 0.05, "text": 0.05, "null": 0.05}

ATTENTION_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"]
MLP_TARGETS = ["mlp.fc1", "mlp.fc2"]


def latent_frames_of(pixel_frames: int) -> tuple[int, int]:
    """(latent frames, pixel frames [0, n) they cover completely) of encoding `pixel_frames` frames,
    chunked as upstream's `encode_micro_frame` with `temporal_overlap=True`."""
    if pixel_frames < 1:
        raise ValueError("at least one pixel frame is needed")
    starts = range(0, max(pixel_frames - 1, 1), CHUNK - 1)
    lengths = [min(start + CHUNK, pixel_frames) - start for start in starts]
    latents = sum((length - 1) // 4 + 1 for length in lengths)
    covered = starts[-1] + 4 * ((lengths[-1] - 1) // 4) + 1
    return latents, covered


def generated_latent_frames(frames: int) -> int:
    """Latent frames sampled for a clip of `frames`: whole chunks, decoding to 16n+1 >= frames."""
    return CHUNK_LATENTS * max(1, math.ceil((frames - 1) / (CHUNK - 1)))


def decoded_frames(latent_frames: int) -> int:
    return (CHUNK - 1) * (latent_frames // CHUNK_LATENTS) + 1


def pixel_frames_of(latent_frames: int) -> int:
    """Pixel frames that `latent_frames` latent frames stand for (the inverse of `latent_frames_of`)."""
    chunks, rest = divmod(latent_frames, CHUNK_LATENTS)
    return (CHUNK - 1) * chunks + (4 * (rest - 1) + 1 if rest else 1)


def image_weight(scale: float, step: int, steps: int, frames: int,
                 device: torch.device | str = "cpu") -> float | torch.Tensor:
    """RFLOW's `scale_image_weight`: per latent frame from 1 (first) up to a value that falls from
    `scale` to 1 over the steps; a scale of at most 1 stays as it is."""
    if scale <= 1.0:
        return scale
    upper = torch.linspace(scale, 1.0, steps)[step]
    return torch.linspace(1.0, float(upper), frames, device=device)[None, None, :, None, None]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """`RFlowScheduler.add_noise`: timestep 1000 is pure noise."""
    return flow_noised(x0, noise, (timestep.float() / 1000)[:, None, None, None, None], sigma_min=0.0)


def frame_layout(frames: int, context: int, height: int, width: int) -> FrameLayout:
    check_context(frames, context)
    side = SPATIAL * PATCH[1]
    if height % side or width % side:
        raise ValueError(f"height and width must be divisible by {side} for Open-Sora v1.3; got {height}x{width}")
    latent_context, covered = latent_frames_of(context)
    return FrameLayout(frames, context, generated_latent_frames(frames), latent_context, covered)


class _NumpyWithIntProd:
    """numpy as upstream's blocks module sees it once compiled, but `np.prod` of a kernel size is a
    Python int: torch.compile traces a numpy scalar as a tensor, and STDiT3's windowed attention sizes
    a view with it, which broke each spatial block's graph and left the rest of the block eager."""

    prod = staticmethod(math.prod)

    def __getattr__(self, name: str):
        return getattr(np, name)


def _frame_mask(batch: int, frames: int, clean: int, device: torch.device) -> torch.Tensor:
    """STDiT3's `x_mask`: True for frames that carry the sampler's timestep, False for clean ones."""
    mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
    mask[:, :clean] = False
    return mask


class OpenSoraV13Backend(OpenSoraBackend):
    attention_targets, mlp_targets = ATTENTION_TARGETS, MLP_TARGETS

    def __init__(self, transformer, vae, caption: torch.Tensor, caption_mask: torch.Tensor | None, fps: float,
                 sampling_steps: int = 30, guidance: float = 7.5, image_guidance: float = 5.0,
                 conditioning: str = "reference", timesteps: str = "model", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, compile: bool = False):
        self.device, self.dtype = torch.device(device), dtype
        self.transformer = transformer.to(self.device, dtype).eval().requires_grad_(False)
        self.transformer.y_embedder.uncond_prob = 0.0  # conditions are dropped by the loss, never inside the model
        self.compiled = compile
        if compile:
            from opensora.models.layers import blocks

            blocks.np = _NumpyWithIntProd()
            compile_blocks((*self.transformer.spatial_blocks, *self.transformer.temporal_blocks))
        self.vae = vae.to(self.device, dtype).eval().requires_grad_(False)
        self.caption = caption.to(self.device, dtype)  # (1, 1, L, caption_channels), encoded once
        # T5's token mask (1, L); upstream applies it to every guidance branch, the null caption's too
        self.caption_mask = None if caption_mask is None else caption_mask.to(self.device)
        self.null_caption = self.transformer.y_embedder.y_embedding[None, None].detach()
        self.fps, self.sampling_steps = fps, sampling_steps
        self.guidance, self.image_guidance = guidance, image_guidance
        self.conditioning, self.timestep_draw = conditioning, timesteps

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> OpenSoraV13Backend:
        m = config.model
        return cls.build(m.pretrained, m.opensora.vae, m.opensora.text_encoder, compile=m.compile,
                         **cls.settings(config))

    @classmethod
    def build(cls, pretrained: str, vae: str, text_encoder: str, prompt: str, size: str, portable_kernels: bool,
              conditioning: str = "reference", **kw):
        """Checkpoints as hub ids or local paths (upstream's own loaders); an empty `pretrained` or
        `vae` gives random weights at `size` ('full': STDiT3-XL/2 and the real VAE; 'tiny': for tests).
        An empty prompt uses the model's learned null caption, so no text encoder is needed."""
        stdit3 = require_opensora("v1.3", portable_kernels)
        from opensora.models.vae_v1_3.vae import OpenSoraVAE_V1_3

        if size == "tiny" and not pretrained:
            transformer = stdit3.STDiT3(stdit3.STDiT3Config(
                depth=2, hidden_size=64, num_heads=4, patch_size=PATCH, caption_channels=32, model_max_length=8,
                qk_norm=True, kernel_size=(8, 8, -1), use_spatial_rope=True, class_dropout_prob=0.0,
                enable_flash_attn=True))
        else:
            transformer = stdit3.STDiT3_XL_2(
                from_pretrained=pretrained or None, qk_norm=True, kernel_size=(8, 8, -1), use_spatial_rope=True,
                class_dropout_prob=0.0, enable_flash_attn=True, force_huggingface=bool(pretrained))
        vae_kw = dict(micro_batch_size=1, micro_frame_size=CHUNK, normalization="video", temporal_overlap=True)
        if size == "tiny" and not vae:
            autoencoder = tiny_vae(**vae_kw)
        else:
            autoencoder = OpenSoraVAE_V1_3(from_pretrained=vae or None, force_huggingface=bool(vae), z_channels=16,
                                           micro_batch_size_2d=4, **vae_kw)
        caption, mask = transformer.y_embedder.y_embedding[None, None].detach(), None
        if prompt:
            caption, mask = encode_prompt(text_encoder, prompt, transformer.config.model_max_length,
                                          aesthetic_suffix=conditioning == "reference")
        return cls(transformer, autoencoder, caption, mask, conditioning=conditioning, **kw)

    # --- frame and latent arithmetic ---------------------------------------------------------
    def frame_layout(self, frames: int, context: int, height: int, width: int) -> FrameLayout:
        return frame_layout(frames, context, height, width)

    # --- the transformer ---------------------------------------------------------------------
    def _velocity(self, x: torch.Tensor, timestep: torch.Tensor, clean: int, caption: torch.Tensor,
                  cond: torch.Tensor | None) -> torch.Tensor:
        """Predicted velocity (towards the data) of latents x (B, C, F, h, w); the first `clean`
        frames are the v2v condition `cond` (upstream's `mask_index`), and with
        conditioning=clean_prefix also get timestep 0 through `x_mask`."""
        batch, channels, frames, h, w = x.shape
        kwargs = {}
        if cond is not None:
            cond_mask = torch.zeros_like(x)
            cond_mask[:, :, :clean] = 1
            kwargs = dict(cond=cond, cond_mask=cond_mask, mask_index=list(range(clean)),
                          y_null=self.null_caption.expand(batch, -1, -1, -1))
            if self.conditioning == "clean_prefix":
                kwargs["x_mask"] = _frame_mask(batch, frames, clean, self.device)
        size = torch.tensor([float(h * SPATIAL)], device=self.device).expand(batch), \
            torch.tensor([float(w * SPATIAL)], device=self.device).expand(batch)
        self.begin_forward()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
            out = self.transformer(x, timestep, caption.expand(batch, -1, -1, -1), mask=self.caption_mask,
                                   height=size[0], width=size[1],
                                   fps=torch.full((batch,), float(self.fps), device=self.device), **kwargs)
        return out[:, :channels].float()  # the second half is the learned sigma (pred_sigma)

    def _shape_args(self, latent_frames: int, h: int, w: int) -> dict[str, torch.Tensor]:
        """The size arguments upstream's `timestep_transform` reads (pixels and pixel frames)."""
        return {k: torch.tensor([float(v)], device=self.device) for k, v in
                dict(height=h * SPATIAL, width=w * SPATIAL, num_frames=pixel_frames_of(latent_frames)).items()}

    def training_loss(self, latents: torch.Tensor, clean_frames: int, generator: torch.Generator) -> torch.Tensor:
        from opensora.schedulers.rf.time_sampler import timestep_transform

        x0 = latents.float()
        batch, _, frames, h, w = x0.shape
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=self.device)) * 1000  # logit-normal
        if self.timestep_draw == "model":
            t = timestep_transform(t, self._shape_args(frames, h, w), num_timesteps=1000)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        if self.conditioning == "clean_prefix":
            xt = add_noise(x0, noise, t)
            xt[:, :, :clean_frames] = x0[:, :, :clean_frames]
            cond = x0 * (torch.arange(frames, device=self.device) < clean_frames)[None, None, :, None, None]
            v = self._velocity(xt, t, clean_frames, self.caption, cond)
            return torch.nn.functional.mse_loss(v[:, :, clean_frames:], (x0 - noise)[:, :, clean_frames:])
        draw = float(torch.rand(1, generator=generator, device=self.device))
        condition = "keep" if clean_frames == 0 else _choose(DROP_CONDITION, draw)
        return self.reference_loss(x0, clean_frames, t, noise, condition)

    def reference_loss(self, x0: torch.Tensor, clean: int, t: torch.Tensor, noise: torch.Tensor,
                       condition: str) -> torch.Tensor:
        """`RFlowScheduler.training_losses` with `mask_index` = the first `clean` frames and the
        drawn `condition` (keep, cond: no text, text: no video condition, null: neither)."""
        cond = x0 * (torch.arange(x0.shape[2], device=self.device) < clean)[None, None, :, None, None]
        if condition in ("text", "null"):
            cond = torch.zeros_like(cond)
        caption = self.null_caption if condition in ("cond", "null") else self.caption
        v = self._velocity(add_noise(x0, noise, t), t, clean, caption, cond)
        return torch.nn.functional.mse_loss(v, x0 - noise)

    def timesteps(self, latent_frames: int, height: int, width: int) -> list[float]:
        """Upstream's rectified-flow schedule (`use_timestep_transform=True`): 1000 -> 0, shifted by
        resolution and length; sampling_steps + 1 values ending at 0."""
        from opensora.schedulers.rf.time_sampler import timestep_transform

        args = {k: v.cpu() for k, v in self._shape_args(latent_frames, height, width).items()}
        steps = [(1 - i / self.sampling_steps) * 1000 for i in range(self.sampling_steps)]
        return [float(timestep_transform(torch.tensor([t]), args, num_timesteps=1000)) for t in steps] + [0.0]

    def sample(self, context_latents: torch.Tensor, latent_frames: int, seed: int) -> torch.Tensor:
        """Upstream's v2v sampling (text+image, image only, neither guidance passes); with
        conditioning=reference `RFLOW.sample(..., use_sdedit=True, oscillation on text and image,
        scale_image_weight)` as the v2v inference config runs it, with clean_prefix the prefix held
        clean under constant guidance."""
        return self.sample_batch(context_latents, latent_frames, [seed])

    def _sample_batch(self, context_latents: torch.Tensor, latent_frames: int, seeds: Sequence[int],
                      noise: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        """`sample` for every context and seed in one batch, the guidance passes in the same forward,
        each continuation's draws from its own seed's generator."""
        batch, channels, clean, h, w = context_latents.shape
        reference = self.conditioning == "reference"
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        x = draw_per_generator(generators, (batch, channels, latent_frames, h, w), self.device)
        ref = torch.zeros_like(x)
        ref[:, :, :clean] = context_latents
        if not reference:
            x[:, :, :clean] = context_latents
        # (caption, v2v condition) per guidance pass
        branches = [(self.caption, ref), (self.null_caption, ref), (self.null_caption, torch.zeros_like(ref))]
        captions = torch.cat([c.expand(batch, -1, -1, -1) for c, _ in branches])
        conds = torch.cat([r for _, r in branches])
        times = self.timesteps(latent_frames, h, w)
        for step, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            timestep = torch.full((batch,), t, device=self.device)
            text_scale, image_scale = self.guidance, self.image_guidance
            if reference:  # SDEdit: the condition frames re-noised to the current level
                noised = add_noise(ref, draw_per_generator(generators, ref.shape, self.device), timestep)
                x = torch.where(torch.arange(latent_frames, device=self.device)[None, None, :, None, None] < clean,
                                noised, x)
                text_scale, image_scale = oscillation_scale(text_scale, step), oscillation_scale(image_scale, step)
                image_scale = image_weight(image_scale, step, len(times) - 1, latent_frames, self.device)
            n = self.guidance_passes(text_scale, image_scale)  # the passes this step's mix reads
            velocity = self._velocity(x.repeat(n, 1, 1, 1, 1), timestep.repeat(n), clean, captions[: batch * n],
                                      conds[: batch * n])
            x = x + self.mix_guidance(velocity, text_scale, image_scale) * (t - t_next) / 1000
            if not reference:
                x[:, :, :clean] = context_latents
        return x


def _choose(weights: dict[str, float], draw: float) -> str:
    """The key whose share of the cumulative weights holds `draw` in [0, 1)."""
    total = 0.0
    for key, weight in weights.items():
        total += weight
        if draw < total:
            return key
    return key


def tiny_vae(**kw):
    """The v1.3 VAE classes at a small width, random weights: same chunking and 4x/8x compression."""
    from opensora.models.vae_v1_3.vae import OpenSoraVAE_V1_3_Pipline, OpenSoraVAE_V1_3_PiplineConfig

    # channels a multiple of 32: the VAE's GroupNorm has 32 groups
    common = dict(z_channels=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1)
    config = OpenSoraVAE_V1_3_PiplineConfig(
        encoder=dict(type="VideoEncoder", double_z=True, down_sampling_layer=[1, 2], **common),
        decoder=dict(type="VideoDecoder", temporal_up_layers=[2, 3], **common))
    return OpenSoraVAE_V1_3_Pipline(config, **kw)


def encode_prompt(text_encoder: str, prompt: str, max_length: int,
                  aesthetic_suffix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt through upstream's T5 wrapper, once (embeddings and token mask), prepared as the
    v2v inference script prepares it (aesthetic-score suffix, T5 text cleaning); the encoder is freed
    afterwards."""
    if not text_encoder:
        raise ValueError("a non-empty model.prompt needs model.text_encoder (e.g. DeepFloyd/t5-v1_1-xxl)")
    from opensora.models.text_encoder.t5 import T5Encoder, text_preprocessing
    from opensora.utils.inference_utils import append_score_to_prompts

    if aesthetic_suffix:
        prompt = append_score_to_prompts([prompt], aes=AESTHETIC_SCORE)[0]
    prompt = text_preprocessing(prompt)

    encoder = T5Encoder(from_pretrained=text_encoder, model_max_length=max_length, dtype=torch.float32)
    with torch.no_grad():
        encoded = encoder.encode(**encoder.tokenize_fn([prompt]))
    return encoded["y"].float(), encoded["mask"]
