"""SkyReels-V2 diffusion forcing (Wan 2.1 architecture, diffusers) as a continuation backend.

Components: `SkyReelsV2Transformer3DModel`, `AutoencoderKLWan` (4x time with a causal first frame,
8x space, 16 latent channels) and UMT5 prompt embeddings, encoded once at load.

Sampling is diffusers' `SkyReelsV2DiffusionForcingVideoToVideoPipeline` for a clip that fits in one
window (no overlap_history chunking), synchronous (ar_step=0), with the context latents as its
prefix video latents and addnoise_condition at its default 0 (tests/test_skyreels_reference.py
checks it is bitwise equal): one noise draw of the whole latent video, the prefix written over it and held at
timestep 0, every other frame stepped by UniPC through the scheduler's timesteps, classifier-free
guidance against the negative prompt. The pipeline keeps one scheduler per latent frame because
asynchronous modes step frames at different timesteps; in the synchronous mode all generated frames
share every timestep, so one scheduler steps them together. The stages sample through
`sample_batch`: every sample of a clip (and of the clips sampled together) and both guidance branches
in one forward per step, equal to that pipeline up to float rounding (tests/test_backend_contract.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKLWan, SkyReelsV2DiffusionForcingVideoToVideoPipeline, SkyReelsV2Transformer3DModel
from diffusers import UniPCMultistepScheduler

from ..config import Config
from .base import FrameLayout, VideoBackend, check_context, default_device, draw_per_generator, flow_noised

# The V2V pipeline's docstring example: UniPC with flow_shift 8.0 ("8.0 for T2V, 5.0 for I2V"),
# guidance 6.0, 50 steps; the prompt padded to its max_sequence_length
FLOW_SHIFT = 8.0
GUIDANCE = 6.0
PROMPT_TOKENS = 512

# Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers' transformer (its VAE is AutoencoderKLWan's defaults)
DF_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, inject_sample_info=True)

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attn1 (self) and attn2 (text) of every Wan block
MLP_TARGETS = ["ffn.net.0.proj", "ffn.net.2"]


def flow_scheduler() -> UniPCMultistepScheduler:
    """UniPC on flow sigmas with the pipeline example's shift, for components built without a checkpoint."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT)


class SkyReelsV2Backend(VideoBackend):
    attention_targets, mlp_targets = ATTENTION_TARGETS, MLP_TARGETS
    batches_clips = True

    def __init__(
        self,
        transformer: SkyReelsV2Transformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: UniPCMultistepScheduler,
        prompt: torch.Tensor,
        negative_prompt: torch.Tensor,
        fps: float,
        sampling_steps: int = 50,
        guidance: float = GUIDANCE,
        timesteps: str = "model",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        # (1, L, text_dim) embeddings, encoded once
        self.prompt = prompt.to(self.device, dtype)
        self.negative_prompt = negative_prompt.to(self.device, dtype)
        self.fps_flag = 0 if fps == 16 else 1  # the transformer's only fps input: 16 fps or not
        self.sampling_steps, self.guidance, self.timestep_draw = sampling_steps, guidance, timesteps
        self.temporal_ratio = 2 ** sum(vae.temperal_downsample)
        self.spatial_ratio = 2 ** len(vae.temperal_downsample)
        self.patch = transformer.config.patch_size

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> SkyReelsV2Backend:
        """`model.pretrained` (a hub id or a local diffusers directory), or random weights when empty: the
        released 1.3B architecture (`model.size=full`, for speed and memory) or tiny components (`tiny`)."""
        m, s = config.model, config.sampling
        if s.image_guidance != 1:
            raise ValueError("sampling.image_guidance is not implemented for model.backend=skyreels-v2")
        common = dict(fps=config.data.fps, sampling_steps=s.steps, guidance=s.guidance,
                      timesteps=config.adaptation.timesteps, device=default_device(), dtype=getattr(torch, m.dtype))
        if m.pretrained:
            return cls.from_pretrained(m.pretrained, m.prompt, m.negative_prompt, **common)
        return cls.small(**common) if m.size == "tiny" else cls.released_size(**common)

    @classmethod
    def reference_deviations(cls, config: Config) -> list[str]:
        guidance = config.sampling.guidance
        return [] if guidance == GUIDANCE else [f"guidance {guidance:g}"]

    @classmethod
    def small(cls, seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 12, text_dim: int = 32,
              prompt_tokens: int = 8, **kw) -> SkyReelsV2Backend:
        """Tiny random components (diffusers' own SkyReels-V2 test sizes, with the fps embedding) and
        random prompt embeddings, for tests and machines without the checkpoint; seeded by `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = SkyReelsV2Transformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=32, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, inject_sample_info=True)
            vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True])
            prompt, negative_prompt = torch.randn(2, 1, prompt_tokens, text_dim)
        return cls(transformer.to(kw.get("dtype", torch.float32)), vae, flow_scheduler(), prompt, negative_prompt, **kw)

    @classmethod
    def released_size(cls, **kw) -> SkyReelsV2Backend:
        """SkyReels-V2-DF-1.3B's transformer and VAE with random weights, built on the device, and random
        prompt embeddings of the pipeline's length: speed and memory do not depend on weight values."""
        dtype, device = kw.get("dtype", torch.float32), kw.get("device", "cpu")
        with torch.device(device):
            transformer = SkyReelsV2Transformer3DModel(**DF_1_3B)
            vae = AutoencoderKLWan()
            prompt, negative_prompt = torch.randn(2, 1, PROMPT_TOKENS, DF_1_3B["text_dim"])
        for name, parameter in transformer.named_parameters():  # the modules from_pretrained(dtype=...) keeps in fp32
            keep = any(module in name.split(".") for module in transformer._keep_in_fp32_modules)
            parameter.data = parameter.data.to(torch.float32 if keep else dtype)
        return cls(transformer, vae, flow_scheduler(), prompt, negative_prompt, **kw)

    @classmethod
    def from_pretrained(cls, path: str, prompt: str, negative_prompt: str = "", **kw) -> SkyReelsV2Backend:
        """A diffusers SkyReels-V2 DF checkpoint: a hub id such as `Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers`
        or a local directory with transformer/, vae/, scheduler/, text_encoder/ and tokenizer/. Loaded
        as the pipeline's example loads it (the VAE in float32, the rest in `dtype`, UniPC with its
        flow_shift); the prompts are encoded once by the pipeline's own `encode_prompt` and the text
        encoder is dropped with the pipeline."""
        from diffusers.utils import is_ftfy_available

        if not is_ftfy_available():
            raise ImportError("the SkyReels-V2 pipeline cleans prompts with ftfy: pip install ftfy")
        dtype = kw.get("dtype", torch.float32)
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        pipe = SkyReelsV2DiffusionForcingVideoToVideoPipeline.from_pretrained(path, vae=vae, dtype=dtype)
        with torch.no_grad():
            embeds = pipe.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=True,
                                        max_sequence_length=PROMPT_TOKENS, device=torch.device("cpu"))
        scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=FLOW_SHIFT)
        return cls(pipe.transformer, vae, scheduler, *embeds, **kw)

    # --- frame and latent arithmetic ---------------------------------------------------------
    def frame_layout(self, frames: int, context: int, height: int, width: int) -> FrameLayout:
        t = self.temporal_ratio
        _, patch_h, patch_w = self.patch
        check_context(frames, context)
        if (frames - 1) % t:
            raise ValueError(f"the Wan VAE needs {t}k+1 frames per clip (a causal first frame, then {t}x in "
                             f"time); got T={frames}")
        if height % (self.spatial_ratio * patch_h) or width % (self.spatial_ratio * patch_w):
            raise ValueError(f"height and width must be divisible by {self.spatial_ratio * patch_h} (the Wan "
                             f"VAE's {self.spatial_ratio}x times the transformer's {patch_h}x{patch_w} patches); "
                             f"got {height}x{width}")
        latent_context = (context - 1) // t + 1  # the first latent frame covers pixel frame 0 alone
        return FrameLayout(frames, context, (frames - 1) // t + 1, latent_context, (latent_context - 1) * t + 1)

    # --- latents -----------------------------------------------------------------------------
    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE config's per-channel latents_mean and 1 / latents_std, shaped as the pipeline shapes them."""
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(self.device, self.vae.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(self.device, self.vae.dtype)
        return mean, inv_std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """The posterior's mode, normalised: the pipeline's prefix video latents."""
        z = self.vae.encode(video.to(self.device, self.vae.dtype)).latent_dist.mode().float()
        mean, inv_std = self._latent_stats()
        return (z - mean) * inv_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The pipeline's decoding of all latent frames; the Wan VAE draws nothing, so `generator` is unused."""
        mean, inv_std = self._latent_stats()
        z = latents.to(self.vae.dtype) / inv_std + mean
        return self.vae.decode(z, return_dict=False)[0].clamp(-1, 1).float()

    # --- the transformer ---------------------------------------------------------------------
    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The transformer with one timestep per latent frame (`timestep` (B, F), sigma x 1000)."""
        # one fps entry for the whole batch: with diffusion forcing the transformer tiles the fps embedding
        # over frames only, so a per-sample list breaks batches of more than one
        return self.transformer(hidden_states=latents.to(self.dtype), timestep=timestep,
                                encoder_hidden_states=prompt.expand(latents.shape[0], -1, -1),
                                enable_diffusion_forcing=True, fps=[self.fps_flag], return_dict=False)[0]

    def training_loss(self, latents: torch.Tensor, clean_frames: int, generator: torch.Generator) -> torch.Tensor:
        """Rectified flow as the model's scheduler defines it (UniPC `flow_prediction`): x_t = (1 - sigma)
        x0 + sigma noise, the transformer at timestep sigma x 1000 predicts noise - x0. The first
        `clean_frames` latent frames are clean at timestep 0 and out of the loss, the diffusion-forcing
        input the pipeline gives its prefix.

        Not the reference: SkyReels-V2's training code is not released. Its diffusion forcing draws a
        noise level per frame; here the noised frames share one level per sample, as synchronous
        sampling denoises them. `adaptation.timesteps=model` draws that level uniformly and shifts it
        with the scheduler's flow_shift (the sampler's own sigma warp); `logit_normal` is sigmoid(N(0, 1)).
        The prompt is never dropped."""
        return self.training_losses([latents], [clean_frames], [generator])[0]

    def training_losses(self, latents: Sequence[torch.Tensor], clean_frames: Sequence[int],
                        generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Clip i's `training_loss` (its encoding, clean prefix and generator, drawn from in that order)
        for several clips in one forward: their items in blocks, one clip after another."""
        x0s, noises, sigmas = [], [], []
        for x0, clean, generator in zip(latents, clean_frames, generators, strict=True):
            batch, frames = x0.shape[0], x0.shape[2]
            if self.timestep_draw == "logit_normal":
                sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=self.device))
            else:
                shift = self.scheduler.config.flow_shift
                u = torch.rand(batch, generator=generator, device=self.device)
                sigma = shift * u / (1 + (shift - 1) * u)
            sigma = sigma[:, None].expand(batch, frames).clone()
            sigma[:, :clean] = 0
            noises.append(torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype))
            x0s.append(x0)
            sigmas.append(sigma)
        x0, noise, sigma = torch.cat(x0s), torch.cat(noises), torch.cat(sigmas)
        v = self._velocity(flow_noised(x0, noise, sigma[:, None, :, None, None]), sigma * 1000, self.prompt)
        sizes = [len(s) for s in sigmas]
        return torch.stack([torch.nn.functional.mse_loss(v_i[:, :, clean:].float(), target[:, :, clean:].float())
                            for v_i, target, clean in zip(v.split(sizes), (noise - x0).split(sizes), clean_frames)])

    @torch.no_grad()
    def sample(self, context: torch.Tensor, latent_frames: int, seed: int) -> torch.Tensor:
        """SkyReelsV2DiffusionForcingVideoToVideoPipeline(video=context, overlap_history=K,
        num_frames=base_num_frames=T, ar_step=0, output_type="latent"), its generator seeded by `seed`,
        bit for bit: the guidance branches in two forwards, as the pipeline runs them."""
        return self._denoise(context, latent_frames, [seed], branches_together=False)

    def _sample_batch(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int],
                      noise: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        """All continuations and both guidance branches in one forward per step: `sample` per context
        and seed up to float rounding (the stages' path)."""
        return self._denoise(contexts, latent_frames, seeds, branches_together=True)

    def _denoise(self, contexts: torch.Tensor, latent_frames: int, seeds: Sequence[int],
                branches_together: bool) -> torch.Tensor:
        batch, channels, prefix, h, w = contexts.shape
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        latents = draw_per_generator(generators, (batch, channels, latent_frames, h, w), self.device)
        latents[:, :, :prefix] = contexts.to(self.dtype)
        guided = self.guidance_passes() == 2
        prompts = torch.cat([self.prompt.expand(batch, -1, -1), self.negative_prompt.expand(batch, -1, -1)])
        self.scheduler.set_timesteps(self.sampling_steps, device=self.device)
        for t in self.scheduler.timesteps:
            timestep = t.expand(batch, latent_frames).clone()
            timestep[:, :prefix] = 0
            if not guided:
                v = self._velocity(latents, timestep, self.prompt)
            elif branches_together:
                cond, uncond = self._velocity(latents.repeat(2, 1, 1, 1, 1), timestep.repeat(2, 1), prompts).chunk(2)
            else:
                cond = self._velocity(latents, timestep, self.prompt)
                uncond = self._velocity(latents, timestep, self.negative_prompt)
            if guided:
                v = uncond + self.guidance * (cond - uncond)
            latents[:, :, prefix:] = self.scheduler.step(v[:, :, prefix:], t, latents[:, :, prefix:],
                                                         return_dict=False)[0]
        return latents

    def guidance_passes(self) -> int:
        """Forwards per sampling step: 2 (prompt and negative prompt) with guidance, else 1 (also when both
        prompts are the same: the guided velocity would be the unguided one, bit for bit)."""
        return 2 if self.guidance > 1 and not torch.equal(self.prompt, self.negative_prompt) else 1

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
