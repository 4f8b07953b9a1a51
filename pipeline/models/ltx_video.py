"""LTX-Video (diffusers `LTXVideoTransformer3DModel`) as a continuation backend.

Two latent spaces share one class:
- pixel space with the transformer's own patchify (the small default: no VAE, fast on a CPU);
- the LTX-Video VAE (`AutoencoderKLLTXVideo`), as in `Lightricks/LTX-Video-0.9.5`: 8x time with a
  causal first frame, 32x space, so clips need 8k+1 frames and sides divisible by 32.

Sampling is diffusers' `LTXConditionPipeline` with the context as a video condition at frame 0,
step for step (tests/test_ltx_reference.py checks equality): the initial noise, then the context
latents drawn from the VAE posterior with the same generator; the context tokens get timestep 0 and
are re-noised each step by `cond_noise_scale` x sigma^2; the pipeline's linear-quadratic sigmas;
classifier-free guidance against the negative prompt in one batched forward; rotary positions from
the pipeline's causal video coordinates. Deviations are settings (sampling.schedule,
sampling.cond_noise_scale, model.vae_posterior), recorded like every other. The adaptation loss
keeps the context tokens clean at timestep 0 and covers only the noised tokens, with
LTX-Video-Trainer's noise-level draw (adaptation.timesteps) and the prompt dropped to the negative
prompt at finetrainers' rate (adaptation.prompt_dropout), so every branch guidance uses adapts.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.ltx.pipeline_ltx_condition import (LTXConditionPipeline, linear_quadratic_schedule,
                                                            retrieve_timesteps)

from ..config import Config
from .base import (BLOCK_COMPILE_MODE, FrameLayout, VideoBackend, check_context, compile_blocks, default_device,
                   draw_per_generator, flow_noised)

# the pipeline hands the scheduler timesteps without sigmas, which makes it warn on every call; we make
# the same call
logging.getLogger("diffusers.schedulers.scheduling_flow_match_euler_discrete").setLevel(logging.ERROR)

_pack = LTXConditionPipeline._pack_latents
_unpack = LTXConditionPipeline._unpack_latents

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MLP_TARGETS = ["ff.net.0.proj", "ff.net.2"]


def small_transformer(patch_size: int, layers: int, heads: int, head_dim: int) -> LTXVideoTransformer3DModel:
    """The embedded default: the LTX-Video transformer at small size, on RGB patches."""
    if heads * head_dim <= 3 * patch_size**2:
        # the velocity target contains the input noise, which a narrower residual stream cannot carry
        raise ValueError(f"model.heads * model.head_dim ({heads * head_dim}) must exceed the {3 * patch_size**2} "
                         f"values of a {patch_size}x{patch_size} RGB patch")
    return LTXVideoTransformer3DModel(
        in_channels=3 * patch_size**2,
        out_channels=3 * patch_size**2,
        patch_size=patch_size,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        num_layers=layers,
        caption_channels=8,
    )


def _checkpointed_block(block: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(block.forward, *args, use_reentrant=False)


# Gradient checkpointing inside the compiled region: the recomputation becomes part of the compiled
# backward, so CUDA graphs can record it (checkpointing around a compiled block cannot: its
# recomputation replays the block's forward graph in the middle of the backward).
compiled_checkpointed_block = torch.compile(_checkpointed_block, mode=BLOCK_COMPILE_MODE, dynamic=False)


def compile_transformer(transformer: LTXVideoTransformer3DModel) -> None:
    """`compile_blocks` on the transformer blocks; with gradient checkpointing on, training steps go
    through `compiled_checkpointed_block` instead. The few layers around the blocks stay eager."""
    compile_blocks(transformer.transformer_blocks)
    if transformer.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(compiled_checkpointed_block)


PROMPT_TOKENS = 256  # LTXConditionPipeline's max_sequence_length: prompts padded (and masked) to this length


class LTXVideoBackend(VideoBackend):
    attention_targets, mlp_targets = ATTENTION_TARGETS, MLP_TARGETS
    can_pretrain = True  # the small default
    takes_noise = True
    batches_clips = True

    def __init__(
        self,
        transformer: LTXVideoTransformer3DModel,
        vae: AutoencoderKLLTXVideo | None,
        scheduler: FlowMatchEulerDiscreteScheduler,
        prompt: tuple[torch.Tensor, torch.Tensor],
        negative_prompt: tuple[torch.Tensor, torch.Tensor],
        fps: float,
        sampling_steps: int = 50,
        schedule: str = "linear_quadratic",
        guidance: float = 3.0,
        cond_noise_scale: float = 0.15,
        vae_posterior: str = "sample",
        decode_timestep: float = 0.0,
        decode_noise_scale: float | None = None,
        timesteps: str = "model",
        prompt_dropout: float = 0.05,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        self.compiled = compile
        if compile:
            compile_transformer(self.transformer)
        self.vae = vae.to(self.device).eval().requires_grad_(False) if vae is not None else None
        self.scheduler = scheduler
        # (embeddings (1, L, caption_channels), attention mask (1, L)), encoded once
        self.prompt = tuple(t.to(self.device) for t in prompt)
        self.negative_prompt = tuple(t.to(self.device) for t in negative_prompt)
        self.fps = fps
        self.sampling_steps, self.schedule, self.guidance = sampling_steps, schedule, guidance
        self.cond_noise_scale, self.vae_posterior = cond_noise_scale, vae_posterior
        self.decode_timestep = decode_timestep
        self.decode_noise_scale = decode_timestep if decode_noise_scale is None else decode_noise_scale
        self.timestep_draw = timesteps
        # dropping the prompt to the negative one changes nothing when they are the same (the small default)
        same = all(torch.equal(a, b) for a, b in zip(self.prompt, self.negative_prompt))
        self.prompt_dropout = 0.0 if same else prompt_dropout
        if vae is None:
            self.temporal_ratio, self.spatial_ratio = 1, 1
        else:
            self.temporal_ratio = vae.temporal_compression_ratio
            self.spatial_ratio = vae.spatial_compression_ratio
        self.patch = transformer.config.patch_size

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> LTXVideoBackend:
        """A checkpoint (model.pretrained), else the small default with the pretrain stage's weights
        (model.weights)."""
        m = config.model
        if m.pretrained:
            if config.sampling.schedule == "linear" and config.sampling.shift != 1:
                raise ValueError("sampling.shift applies to the small default; a checkpoint's scheduler/ config sets "
                                 "its own")
            return cls.from_pretrained(m.pretrained, m.prompt, m.negative_prompt, **cls._settings(config))
        weights = Path(m.ltx_video.weights)
        if not weights.exists():
            raise FileNotFoundError(f"model.weights={weights} does not exist: run the pretrain stage first "
                                    f"(python -m pipeline pretrain) or point model.pretrained at a checkpoint")
        return cls._small_default(config, weights)

    @classmethod
    def untrained(cls, config: Config) -> LTXVideoBackend:
        return cls._small_default(config, None)

    @classmethod
    def _small_default(cls, config: Config, weights: Path | None) -> LTXVideoBackend:
        o = config.model.ltx_video
        return cls.small(weights, o.patch_size, o.layers, o.heads, o.head_dim, shift=config.sampling.shift,
                         **cls._settings(config))

    @staticmethod
    def _settings(config: Config) -> dict:
        """The constructor's settings from the config, for a checkpoint and the small default alike."""
        o, s = config.model.ltx_video, config.sampling
        if s.image_guidance != 1:
            raise ValueError("sampling.image_guidance is not implemented for model.backend=ltx-video")
        return dict(fps=config.data.fps, sampling_steps=s.steps, schedule=s.schedule, guidance=s.guidance,
                    cond_noise_scale=s.cond_noise_scale, vae_posterior=o.vae_posterior,
                    decode_timestep=o.decode_timestep, decode_noise_scale=o.decode_noise_scale,
                    timesteps=config.adaptation.timesteps, prompt_dropout=config.adaptation.prompt_dropout,
                    device=default_device(), dtype=getattr(torch, config.model.dtype), compile=config.model.compile)

    @classmethod
    def reference_deviations(cls, config: Config) -> list[str]:
        s = config.sampling
        deviations = []
        if s.schedule != "linear_quadratic":
            deviations.append(f"{s.schedule} schedule" + (f" shift {s.shift:g}" if s.shift != 1 else ""))
        if s.cond_noise_scale != 0.15:
            deviations.append("clean context" if s.cond_noise_scale == 0
                              else f"context re-noised x{s.cond_noise_scale:g}")
        if config.model.ltx_video.vae_posterior != "sample" and config.model.pretrained:
            deviations.append("posterior mode")
        return deviations

    @classmethod
    def small(cls, weights: str | Path | None, patch_size: int, layers: int, heads: int, head_dim: int,
              shift: float = 1.0, **kw):
        """The small default; `weights` is a safetensors file from the pretrain stage (None: random).
        It has no text encoder: its prompt is one token of zeros."""
        transformer = small_transformer(patch_size, layers, heads, head_dim)
        if weights is not None:
            from safetensors.torch import load_file

            transformer.load_state_dict(load_file(str(weights)))
        null_prompt = (torch.zeros(1, 1, transformer.config.caption_channels), torch.ones(1, 1, dtype=torch.bool))
        return cls(transformer, None, FlowMatchEulerDiscreteScheduler(shift=shift), null_prompt, null_prompt, **kw)

    @classmethod
    def from_pretrained(cls, path: str, prompt: str, negative_prompt: str = "", **kw):
        """A diffusers LTX-Video checkpoint: a hub id such as `Lightricks/LTX-Video-0.9.5` or a local
        directory with transformer/, vae/, scheduler/, text_encoder/ and tokenizer/. The prompts are
        encoded once, as the pipeline encodes them, and the text encoder is dropped."""
        from transformers import AutoTokenizer, T5EncoderModel

        dtype = kw.get("dtype", torch.float32)
        transformer = LTXVideoTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKLLTXVideo.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)

        embeds = []  # (embeddings, mask) of the prompt, then of the negative prompt
        with torch.no_grad():
            for text in (prompt, negative_prompt):
                tokens = tokenizer([text], padding="max_length", max_length=PROMPT_TOKENS, truncation=True,
                                   add_special_tokens=True, return_tensors="pt")
                mask = tokens.attention_mask.bool()
                embeds.append((text_encoder(tokens.input_ids, attention_mask=mask)[0].float(), mask))
        del text_encoder
        return cls(transformer, vae, scheduler, *embeds, **kw)

    # --- frame and latent arithmetic ---------------------------------------------------------
    def frame_layout(self, frames: int, context: int, height: int, width: int) -> FrameLayout:
        t, s = self.temporal_ratio, self.spatial_ratio * self.patch
        check_context(frames, context)
        if height % s or width % s:
            raise ValueError(f"height and width must be divisible by {s} for this model; got {height}x{width}")
        if t == 1:
            return FrameLayout(frames, context, frames, context, context)
        if (frames - 1) % t:
            raise ValueError(f"this model needs {t}k+1 frames per clip; got T={frames}")
        latent_context = (context - 1) // t + 1  # the causal first latent frame covers pixel frame 0 alone
        covered = (latent_context - 1) * t + 1
        return FrameLayout(frames, context, (frames - 1) // t + 1, latent_context, covered)

    # --- latents -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels, or with a VAE the parameters of its posterior (mean and log-variance), which
        `latents_from` turns into latents: the cache keeps what is deterministic."""
        video = video.to(self.device, self.dtype)
        if self.vae is None:
            return video
        return self.vae.encode(video).latent_dist.parameters

    def latents_from(self, encoding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            return encoding
        posterior = DiagonalGaussianDistribution(encoding)
        z = posterior.sample(generator) if self.vae_posterior == "sample" else posterior.mode()
        return LTXConditionPipeline._normalize_latents(z, self.vae.latents_mean, self.vae.latents_std)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1).float()
        z = LTXConditionPipeline._denormalize_latents(latents, self.vae.latents_mean, self.vae.latents_std,
                                                      self.vae.config.scaling_factor).to(self.dtype)
        timestep = None
        if self.vae.config.timestep_conditioning:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = (1 - self.decode_noise_scale) * z + self.decode_noise_scale * noise
            timestep = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
        return self.vae.decode(z, timestep, return_dict=False)[0].clamp(-1, 1).float()

    # --- the transformer on packed tokens ----------------------------------------------------
    def _video_coords(self, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """The pipeline's rotary coordinates: pixel positions, the temporal one shifted for the VAE's
        causal first frame, in seconds."""
        ids = LTXConditionPipeline._prepare_video_ids(batch, *grid, patch_size=1, device=self.device)
        coords = LTXConditionPipeline._scale_video_ids(ids, self.spatial_ratio * self.patch, self.temporal_ratio)
        coords = coords.float()
        coords[:, 0] = coords[:, 0] * (1.0 / self.fps)
        return coords

    def _velocity(self, tokens: torch.Tensor, timesteps: torch.Tensor, coords: torch.Tensor,
                  prompt: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The transformer on packed tokens with per-token `timesteps` (sigma x 1000)."""
        batch = tokens.shape[0]
        embeds, mask = (p.expand(batch, *p.shape[1:]) for p in prompt)
        self.begin_forward()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.transformer(
                hidden_states=tokens.to(self.dtype),
                encoder_hidden_states=embeds.to(self.dtype),
                timestep=timesteps,
                encoder_attention_mask=mask,
                video_coords=coords,
                return_dict=False,
            )[0]
        return out.to(tokens.dtype)

    def _grid(self, latents_shape: torch.Size) -> tuple[int, int, int]:
        _, _, f, h, w = latents_shape
        return f, h // self.patch, w // self.patch

    def training_loss(self, latents: torch.Tensor, clean_frames: int, generator: torch.Generator) -> torch.Tensor:
        return self.training_losses([latents], [clean_frames], [generator])[0]

    def training_losses(self, latents: Sequence[torch.Tensor], clean_frames: Sequence[int],
                        generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Clip i's loss (its encoding, clean prefix and generator, drawn from in `training_loss`'s
        order) for several clips in one forward: their items in blocks, one clip after another."""
        x0s, noises, sigmas, prompts = [], [], [], []
        for encoding, clean_frames_i, generator in zip(latents, clean_frames, generators, strict=True):
            z = self.latents_from(encoding, generator)
            grid = self._grid(z.shape)
            x0 = _pack(z, self.patch)
            batch, tokens, _ = x0.shape
            sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=self.device) + self._sigma_shift(tokens))
            noises.append(torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype))
            sigma = sigma[:, None].expand(batch, tokens).clone()
            sigma[:, :clean_frames_i * grid[1] * grid[2]] = 0
            x0s.append(x0)
            sigmas.append(sigma)
            prompts.append(self._training_prompt(batch, generator))
        x0, noise, sigma = torch.cat(x0s), torch.cat(noises), torch.cat(sigmas)
        prompt = tuple(torch.cat([p[k].expand(len(s), *p[k].shape[1:]) for p, s in zip(prompts, sigmas)])
                       for k in range(2))
        xt = flow_noised(x0, noise, sigma[..., None])
        v = self._velocity(xt, sigma * 1000, self._video_coords(len(x0), grid), prompt)
        losses = []
        for v_i, target, clean_frames_i in zip(v.split([len(s) for s in sigmas]), (noise - x0).split(
                [len(s) for s in sigmas]), clean_frames):
            clean = clean_frames_i * grid[1] * grid[2]
            losses.append(torch.nn.functional.mse_loss(v_i[:, clean:].float(), target[:, clean:].float()))
        return torch.stack(losses)

    def _training_prompt(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt per sample, the negative one for a `prompt_dropout` share of them."""
        if self.prompt_dropout == 0:
            return self.prompt
        drop = torch.rand(batch, generator=generator, device=self.device) < self.prompt_dropout
        return tuple(torch.where(drop.view(-1, *[1] * (p.dim() - 1)), n, p)
                     for p, n in zip(self.prompt, self.negative_prompt))

    def _sigma_shift(self, tokens: int) -> float:
        """The mean of the logit-normal noise-level draw. `model`: LTX-Video-Trainer's shifted
        logit-normal, the mean linear in the token count (0.95 at 1,024 tokens, 2.05 at 4,096), so
        longer videos train at higher noise; `logit_normal`: 0."""
        if self.timestep_draw == "logit_normal":
            return 0.0
        return 0.95 + (tokens - 1024) * (2.05 - 0.95) / (4096 - 1024)

    def timesteps(self, steps: int | None = None) -> torch.Tensor:
        """The sampler's timesteps (sigma x 1000, from 1000 down) for `steps` (default: the configured
        count), set on the scheduler."""
        steps = steps or self.sampling_steps
        if self.schedule == "linear_quadratic":
            return retrieve_timesteps(self.scheduler, steps, self.device, linear_quadratic_schedule(steps) * 1000)[0]
        return retrieve_timesteps(self.scheduler, steps, self.device)[0]

    def sample(self, context: torch.Tensor, latent_frames: int, seed: int) -> torch.Tensor:
        return self.sample_batch(context, latent_frames, [seed])

    def draw_noise(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int]) -> torch.Tensor:
        return self._draw_noise([torch.Generator(self.device).manual_seed(seed) for seed in seeds], contexts,
                                latent_frames)

    def _draw_noise(self, generators: list[torch.Generator], contexts: torch.Tensor, latent_frames: int) -> torch.Tensor:
        *_, h, w = contexts.shape
        shape = (1, self.transformer.config.in_channels // self.patch**2, latent_frames, h, w)
        return draw_per_generator(generators, shape, self.device)

    def _sample_batch(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int],
                      noise: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        """LTXConditionPipeline(conditions=[LTXVideoCondition(video=context, frame_index=0)],
        generator=[one per seed], output_type="latent"): continuation i of context i drawn from the
        generator seeded by seeds[i], in one batch, as one call per context and seed draws it; `noise`
        replaces the generators' first draw (they still make it, so every later draw is the same)."""
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        batch = len(seeds)
        drawn = self._draw_noise(generators, contexts, latent_frames)
        noise = drawn if noise is None else noise
        context_latents = torch.cat([self.latents_from(c[None], g).float() for c, g in zip(contexts, generators)])
        grid = self._grid(noise.shape)
        x = _pack(torch.cat([context_latents, noise[:, :, context_latents.shape[2]:]], dim=2), self.patch)
        mask = torch.zeros(x.shape[:2], device=self.device)
        mask[:, : _pack(context_latents, self.patch).shape[1]] = 1
        init = x.clone()
        guided = self.guidance > 1
        coords = self._video_coords(2 * batch if guided else batch, grid)
        prompt = tuple(torch.cat([n.expand(batch, *n.shape[1:]), p.expand(batch, *p.shape[1:])])
                       for n, p in zip(self.negative_prompt, self.prompt)) if guided else self.prompt
        for t in self.timesteps(steps):
            if self.cond_noise_scale > 0:
                fresh = draw_per_generator(generators, x.shape, x.device, x.dtype)
                renoised = init + self.cond_noise_scale * fresh * (t / 1000.0) ** 2
                x = torch.where(mask[..., None] > 1 - 1e-6, renoised, x)
            token_t = torch.minimum(t.expand(batch).unsqueeze(-1).float(), (1 - mask) * 1000.0)
            if guided:
                uncond, cond = self._velocity(x.repeat(2, 1, 1), token_t.repeat(2, 1), coords, prompt).chunk(2)
                v = uncond + self.guidance * (cond - uncond)
            else:
                v = self._velocity(x, token_t, coords, prompt)
            stepped = self.scheduler.step(-v, t, x, per_token_timesteps=token_t, return_dict=False)[0]
            x = torch.where((t / 1000 - 1e-6 < (1.0 - mask))[..., None], stepped, x)
        return _unpack(x, latent_frames, grid[1], grid[2], self.patch)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
        if self.compiled:
            compile_transformer(self.transformer)  # again, now with the checkpoint inside the compiled region

