"""LTX-Video (diffusers `LTXVideoTransformer3DModel`) as a continuation backend.

Two latent spaces share one class:
- pixel space with the transformer's own patchify (the small default: no VAE, fast on a CPU);
- the LTX-Video VAE (`AutoencoderKLLTXVideo`), as in `Lightricks/LTX-Video-0.9.5`: 8x time with a
  causal first frame, 32x space, so clips need 8k+1 frames and sides divisible by 32.

Conditioning follows `LTXConditionPipeline`: clean prefix latent tokens get timestep 0 and are put
back after every sampler step; the loss covers only the noised tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXConditionPipeline

from .base import FrameLayout, VideoBackend

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
compiled_checkpointed_block = torch.compile(_checkpointed_block, mode="reduce-overhead", dynamic=False)


def compile_blocks(transformer: LTXVideoTransformer3DModel) -> None:
    """Regional compilation: each transformer block through torch.compile with CUDA graphs
    ("reduce-overhead"); with gradient checkpointing on, training steps go through
    `compiled_checkpointed_block` instead. The blocks share one compiled graph (same code, weights as
    graph inputs), so compiling costs one block instead of the whole model; compilation happens at the
    first call, so adapters added before it are part of the graph. The few layers around the blocks
    stay eager."""
    for block in transformer.transformer_blocks:
        block.compile(mode="reduce-overhead", dynamic=False)
    if transformer.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(compiled_checkpointed_block)


class LTXVideoBackend(VideoBackend):
    attention_targets, mlp_targets = ATTENTION_TARGETS, MLP_TARGETS

    def __init__(
        self,
        transformer: LTXVideoTransformer3DModel,
        vae: AutoencoderKLLTXVideo | None,
        prompt_embeds: torch.Tensor,
        fps: float,
        sampling_steps: int = 20,
        shift: float = 1.0,
        decode_timestep: float = 0.05,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        self.compiled = compile
        if compile:
            compile_blocks(self.transformer)
        self.vae = vae.to(self.device).eval().requires_grad_(False) if vae is not None else None
        self.prompt_embeds = prompt_embeds.to(self.device)  # (1, L, caption_channels), computed once
        self.fps = fps
        self.sampling_steps = sampling_steps
        self.shift = shift
        self.decode_timestep = decode_timestep
        if vae is None:
            self.temporal_ratio, self.spatial_ratio = 1, 1
        else:
            self.temporal_ratio = vae.temporal_compression_ratio
            self.spatial_ratio = vae.spatial_compression_ratio
        self.patch = transformer.config.patch_size

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def small(cls, weights: str | Path | None, patch_size: int, layers: int, heads: int, head_dim: int, **kw):
        """The small default; `weights` is a safetensors file from the pretrain stage (None: random)."""
        transformer = small_transformer(patch_size, layers, heads, head_dim)
        if weights is not None:
            from safetensors.torch import load_file

            transformer.load_state_dict(load_file(str(weights)))
        null_prompt = torch.zeros(1, 1, transformer.config.caption_channels)
        return cls(transformer, None, null_prompt, **kw)

    @classmethod
    def from_pretrained(cls, path: str, prompt: str, **kw):
        """A diffusers LTX-Video checkpoint: a hub id such as `Lightricks/LTX-Video-0.9.5` or a local
        directory with transformer/, vae/, text_encoder/ and tokenizer/. The prompt is encoded once
        and the text encoder is dropped."""
        from transformers import AutoTokenizer, T5EncoderModel

        dtype = kw.get("dtype", torch.float32)
        transformer = LTXVideoTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKLLTXVideo.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
        tokens = tokenizer([prompt], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        with torch.no_grad():
            embeds = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        keep = int(tokens.attention_mask.sum())  # drop padding so no attention mask is needed later
        del text_encoder
        return cls(transformer, vae, embeds[:, :keep].float(), **kw)

    # --- frame and latent arithmetic ---------------------------------------------------------
    def frame_layout(self, frames: int, context: int, height: int, width: int) -> FrameLayout:
        t, s = self.temporal_ratio, self.spatial_ratio * self.patch
        if not 0 < context < frames:
            raise ValueError(f"context frames K={context} must satisfy 0 < K < T={frames}")
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
        video = video.to(self.device, self.dtype)
        if self.vae is None:
            return video
        z = self.vae.encode(video).latent_dist.mode()
        return LTXConditionPipeline._normalize_latents(z, self.vae.latents_mean, self.vae.latents_std)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1).float()
        z = LTXConditionPipeline._denormalize_latents(latents, self.vae.latents_mean, self.vae.latents_std)
        timestep = None
        if self.vae.config.timestep_conditioning:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = (1 - self.decode_timestep) * z + self.decode_timestep * noise
            timestep = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
        return self.vae.decode(z, timestep, return_dict=False)[0].clamp(-1, 1).float()

    # --- the transformer on packed tokens ----------------------------------------------------
    def _velocity(self, tokens: torch.Tensor, sigmas: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        batch = tokens.shape[0]
        text = self.prompt_embeds.expand(batch, -1, -1).to(tokens.dtype)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # each call starts a new CUDA-graph step
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.transformer(
                hidden_states=tokens,
                encoder_hidden_states=text,
                timestep=sigmas * 1000,
                encoder_attention_mask=torch.ones(text.shape[:2], device=self.device),
                num_frames=grid[0],
                height=grid[1],
                width=grid[2],
                rope_interpolation_scale=(self.temporal_ratio / self.fps, self.spatial_ratio, self.spatial_ratio),
                return_dict=False,
            )[0]
        return out.to(tokens.dtype)

    def _grid(self, latents_shape: torch.Size) -> tuple[int, int, int]:
        _, _, f, h, w = latents_shape
        return f, h // self.patch, w // self.patch

    def training_loss(self, latents: torch.Tensor, clean_frames: int, generator: torch.Generator) -> torch.Tensor:
        grid = self._grid(latents.shape)
        x0 = _pack(latents, self.patch)
        batch, tokens, _ = x0.shape
        clean = clean_frames * grid[1] * grid[2]
        # logit-normal sigma, as in the rectified-flow recipes for LTX-Video
        sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=self.device))
        noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        sigmas = sigma[:, None].expand(batch, tokens).clone()
        sigmas[:, :clean] = 0
        xt = (1 - sigmas[..., None]) * x0 + sigmas[..., None] * noise
        v = self._velocity(xt, sigmas, grid)
        return torch.nn.functional.mse_loss(v[:, clean:].float(), (noise - x0)[:, clean:].float())

    def sigma_schedule(self) -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=self.shift)
        scheduler.set_timesteps(self.sampling_steps, device=self.device)
        return scheduler.sigmas  # sampling_steps + 1 values from 1 down to 0

    @torch.no_grad()
    def sample(self, context_latents: torch.Tensor, latent_frames: int, seed: int) -> torch.Tensor:
        batch, channels, prefix, h, w = context_latents.shape
        generator = torch.Generator(self.device).manual_seed(seed)
        shape = (batch, channels, latent_frames, h, w)
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=context_latents.dtype)
        grid = self._grid(shape)
        x = _pack(noise, self.patch)
        clean_tokens = _pack(context_latents, self.patch)
        n_clean = clean_tokens.shape[1]
        x[:, :n_clean] = clean_tokens
        sigmas = self.sigma_schedule()
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            token_sigmas = torch.full(x.shape[:2], float(sigma), device=self.device)
            token_sigmas[:, :n_clean] = 0
            x = x + (sigma_next - sigma) * self._velocity(x, token_sigmas, grid)
            x[:, :n_clean] = clean_tokens
        return _unpack(x, latent_frames, grid[1], grid[2], self.patch)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
        if self.compiled:
            compile_blocks(self.transformer)  # again, now with the checkpoint inside the compiled region


def frames_to_tensor(frames, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) float in [-1, 1] on `device` (copied as uint8, converted there)."""
    video = torch.as_tensor(frames).to(device).permute(3, 0, 1, 2).float() / 127.5 - 1
    return video[None]


def tensor_to_frames(video: torch.Tensor):
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 numpy."""
    return ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


