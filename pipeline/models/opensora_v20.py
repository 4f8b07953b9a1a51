"""Open-Sora v2.0 (MMDiT "flux" + HunyuanVideo VAE + T5-XXL + CLIP-L) through the upstream package.

Latent alignment. The HunyuanVideo VAE is causal with 4x time and 8x space compression: a clip needs
4k+1 frames, latent frame 0 is pixel frame 0 alone and latent frame j covers frames 4j-3..4j. The
transformer packs 2x2 latent patches, so sides must be divisible by 16. The seed shape, 65 frames
with K=33, is 17 latent frames of which the first 9 (pixel frames [0, 33) exactly) are the context:
upstream's `v2v_head` (`prepare_inference_condition` in opensora/utils/inference.py) uses the same
8 + 1 latent frames.

Conditioning follows upstream's `I2VDenoiser` (opensora/utils/sampling.py): the context enters only
through the 68-channel `cond` input (a 1-channel mask and the masked latents, packed); MMDiT has one
timestep per sample, so the context's own latent tokens are noised like the rest. Guidance mixes
three passes: text+image, image only (empty prompt), neither. `model.conditioning`:
- `reference` (the default): `I2VDenoiser.denoise` as configs/diffusion/inference/256px.py runs it
  (oscillation guidance on text and image; no temporal image scaling, which upstream keeps for
  i2v), nothing put back after the last step, the prompt with the script's suffixes ("24 FPS." at
  data.fps, "4 motion score."). The loss is the training script's (scripts/diffusion/train.py):
  `time_shift`ed logit-normal t, sigma_min in the noising and target, T5 and CLIP dropped to the
  empty prompt at 0.316 each, every token in the loss. The released training configs list t2v and
  i2v only: continuing a video is zero-shot use of its condition path.
- `clean_prefix`: constant guidance, the clean context put back once after the last step, plain
  prompt, the loss on the generated latent frames only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange

from ..config import Config
from .base import FrameLayout, check_context, compile_blocks, draw_per_generator, flow_noised
from .upstream import OpenSoraBackend, oscillation_scale, require_opensora

TEMPORAL, SPATIAL, PATCH = 4, 8, 2
T5_TOKENS, T5_WIDTH, CLIP_WIDTH = 512, 4096, 768
SIGMA_MIN = 1e-5  # scripts/diffusion/train.py
TEXT_DROPOUT = 0.31622777  # configs/diffusion/train/image.py: dropout_ratio, T5 and CLIP each
MOTION_SCORE = "4"  # configs/diffusion/inference/256px.py

# the 256px / 768px inference configs (configs/diffusion/inference/256px.py), with unfused q/k/v
FULL = dict(in_channels=64, vec_in_dim=CLIP_WIDTH, context_in_dim=T5_WIDTH, hidden_size=3072, mlp_ratio=4.0,
            num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
            guidance_embed=False, cond_embed=True, fused_qkv=False, use_liger_rope=False)
TINY = dict(FULL, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12])

# PEFT matches these as module-name suffixes. With unfused q/k/v the double blocks' image and text
# attention are {img,txt}_attn.{q_proj,k_proj,v_proj,proj}; the single blocks' fused `linear1` is
# split into q_proj, k_proj and v_mlp (value and MLP input), `linear2` is their output.
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "img_attn.proj", "txt_attn.proj", "v_mlp", "linear2"]
MLP_TARGETS = ["img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"]


def frame_layout(frames: int, context: int, height: int, width: int) -> FrameLayout:
    check_context(frames, context)
    side = SPATIAL * PATCH
    if height % side or width % side:
        raise ValueError(f"height and width must be divisible by {side} for Open-Sora v2.0; got {height}x{width}")
    if (frames - 1) % TEMPORAL:
        raise ValueError(f"Open-Sora v2.0 needs {TEMPORAL}k+1 frames per clip; got T={frames}")
    latent_context = (context - 1) // TEMPORAL + 1
    return FrameLayout(frames, context, (frames - 1) // TEMPORAL + 1, latent_context,
                       (latent_context - 1) * TEMPORAL + 1)


def pack(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (c ph pw)", ph=PATCH, pw=PATCH)


def unpack(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    return rearrange(tokens, "b (t h w) (c ph pw) -> b c t (h ph) (w pw)", t=frames, h=height // PATCH,
                     w=width // PATCH, ph=PATCH, pw=PATCH)


def image_ids(batch: int, frames: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Upstream's positional ids (t, h, w) of each packed latent token, as in `prepare`."""
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height // PATCH), torch.arange(width // PATCH),
                             indexing="ij")
    ids = torch.stack([t, h, w], dim=-1).reshape(1, -1, 3).float()
    return ids.expand(batch, -1, -1).to(device)


def condition(context: torch.Tensor, frames: int) -> torch.Tensor:
    """The packed `cond` input: a mask channel (1 on context frames) and the latents, zero elsewhere."""
    batch, channels, clean, h, w = context.shape
    masks = torch.zeros(batch, 1, frames, h, w, device=context.device)
    masked = torch.zeros(batch, channels, frames, h, w, device=context.device)
    masks[:, :, :clean] = 1
    masked[:, :, :clean] = context
    return pack(torch.cat([masks, masked], dim=1))


def shift_alpha(tokens_per_frame: int, frames: int) -> float:
    """Upstream's resolution- and length-dependent shift (`get_res_lin_function` x sqrt(frames))."""
    return (1 + (tokens_per_frame - 256) * (3 - 1) / (4096 - 256)) * math.sqrt(frames)


def time_shift(alpha: float, t: torch.Tensor) -> torch.Tensor:
    return alpha * t / (1 + (alpha - 1) * t)


def shifted_timesteps(steps: int, tokens_per_frame: int, frames: int) -> list[float]:
    """1 -> 0 in `steps` steps, shifted towards 1 by resolution and length, as upstream's
    `get_schedule(..., shift=True)` (opensora/utils/sampling.py; compared in the integration tests)."""
    return time_shift(shift_alpha(tokens_per_frame, frames), torch.linspace(1, 0, steps + 1)).tolist()


class OpenSoraV20Backend(OpenSoraBackend):
    attention_targets, mlp_targets = ATTENTION_TARGETS, MLP_TARGETS
    batches_clips = True

    def __init__(self, transformer, vae, text: torch.Tensor, null_text: torch.Tensor, vec: torch.Tensor,
                 null_vec: torch.Tensor, sampling_steps: int = 25, guidance: float = 7.5, image_guidance: float = 3.0,
                 conditioning: str = "reference", timesteps: str = "model", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, compile: bool = False):
        self.device, self.dtype = torch.device(device), dtype
        self.transformer = transformer.to(self.device, dtype).eval().requires_grad_(False)
        self.compiled = compile
        if compile:
            compile_blocks((*self.transformer.double_blocks, *self.transformer.single_blocks))
        self.vae = vae.to(self.device, dtype).eval().requires_grad_(False)
        # prompt and empty-prompt embeddings, computed once; the text encoders are not kept
        self.text, self.null_text = text.to(self.device, dtype), null_text.to(self.device, dtype)
        self.vec, self.null_vec = vec.to(self.device, dtype), null_vec.to(self.device, dtype)
        self.sampling_steps, self.guidance, self.image_guidance = sampling_steps, guidance, image_guidance
        self.conditioning, self.timestep_draw = conditioning, timesteps

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> OpenSoraV20Backend:
        m = config.model
        return cls.build(m.pretrained, m.opensora.vae, m.opensora.text_encoder, m.opensora_v20.clip_encoder,
                         compile=m.compile, **cls.settings(config))

    @classmethod
    def build(cls, pretrained: str, vae: str, text_encoder: str, clip_encoder: str, prompt: str, size: str,
              portable_kernels: bool, fps: float = 24.0, conditioning: str = "reference", **kw):
        """Checkpoints as local paths (upstream's safetensors files: Open_Sora_v2.safetensors,
        hunyuan_vae.safetensors) and hub ids or directories for T5 and CLIP. Empty `pretrained`/`vae`
        give random weights at `size` ('full' = 11B MMDiT and the real VAE, 'tiny' for tests)."""
        if (pretrained or prompt) and not (text_encoder and clip_encoder):
            raise ValueError("a real Open-Sora v2.0 checkpoint or a prompt needs model.text_encoder "
                             "(google/t5-v1_1-xxl) and model.clip_encoder (openai/clip-vit-large-patch14), "
                             "even for an empty prompt")
        mmdit = require_opensora("v2.0", portable_kernels)
        from opensora.models.hunyuan_vae.autoencoder_kl_causal_3d import CausalVAE3D_HUNYUAN

        device, dtype = kw.get("device", "cpu"), kw.get("dtype", torch.bfloat16)
        arch = TINY if size == "tiny" and not pretrained else FULL
        transformer = mmdit.Flux(from_pretrained=pretrained or None, device_map=device, torch_dtype=dtype, **arch)
        vae_kw = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                      use_spatial_tiling=True, use_temporal_tiling=False)
        if size == "tiny" and not vae:
            vae_kw.update(layers_per_block=1, block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
                          use_spatial_tiling=False)
        autoencoder = CausalVAE3D_HUNYUAN(from_pretrained=vae or None, device_map=device, torch_dtype=dtype, **vae_kw)
        if text_encoder and clip_encoder:
            if conditioning == "reference":
                prompt = with_suffixes(prompt, fps)
            text, null_text, vec, null_vec = encode_prompts(text_encoder, clip_encoder, prompt)
        else:  # random weights: embeddings of the right shape, zero
            text = null_text = torch.zeros(1, T5_TOKENS, T5_WIDTH)
            vec = null_vec = torch.zeros(1, CLIP_WIDTH)
        return cls(transformer, autoencoder, text, null_text, vec, null_vec, conditioning=conditioning, **kw)

    # --- frame and latent arithmetic ---------------------------------------------------------
    def frame_layout(self, frames: int, context: int, height: int, width: int) -> FrameLayout:
        return frame_layout(frames, context, height, width)

    # --- the transformer on packed tokens ----------------------------------------------------
    def _velocity(self, tokens: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, cond: torch.Tensor,
                  text: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """Predicted velocity (noise minus data) of packed tokens at times t in [0, 1]."""
        batch = tokens.shape[0]
        text_ids = torch.zeros(batch, text.shape[1], 3, device=self.device)
        self.begin_forward()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
            out = self.transformer(img=tokens.to(self.dtype), img_ids=ids, txt=text, txt_ids=text_ids,
                                   timesteps=t.to(self.dtype), y_vec=vec, cond=cond.to(self.dtype))
        return out.float()

    def training_loss(self, latents: torch.Tensor, clean_frames: int, generator: torch.Generator) -> torch.Tensor:
        return self.training_losses([latents], [clean_frames], [generator])[0]

    def training_losses(self, latents: Sequence[torch.Tensor], clean_frames: Sequence[int],
                        generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Clip i's loss (its encoding, clean prefix and generator, drawn from in that order) for
        several clips in one forward, their items in blocks. conditioning=reference: the training
        script's (scripts/diffusion/train.py: x_t with sigma_min, target (1 - sigma_min) noise - x0,
        every token, T5 and CLIP dropped per item); clean_prefix: plain rectified flow, the loss on
        the generated latent frames only."""
        inputs, targets, firsts = [], [], []
        for x0, clean, generator in zip(latents, clean_frames, generators, strict=True):
            x0 = x0.float()
            batch, _, frames, h, w = x0.shape
            t = torch.sigmoid(torch.randn(batch, generator=generator, device=self.device))
            if self.timestep_draw == "model":
                t = time_shift(shift_alpha((h // PATCH) * (w // PATCH), frames), t)
            noise = torch.randn(x0.shape, generator=generator, device=self.device)
            text, vec = self.text.expand(batch, -1, -1), self.vec.expand(batch, -1)
            if self.conditioning == "clean_prefix":
                sigma_min, first = None, clean * (h // PATCH) * (w // PATCH)  # tokens are frame-major
            else:
                sigma_min, first = SIGMA_MIN, 0
                drop = torch.rand(2, batch, generator=generator, device=self.device) < TEXT_DROPOUT  # T5, CLIP
                text = torch.where(drop[0, :, None, None], self.null_text, text)
                vec = torch.where(drop[1, :, None], self.null_vec, vec)
            xt = flow_noised(x0, noise, t[:, None, None, None, None], sigma_min)
            inputs.append((pack(xt), t, image_ids(batch, frames, h, w, self.device),
                           condition(x0[:, :, :clean], frames), text, vec))
            targets.append(pack(noise - x0 if sigma_min is None else (1 - sigma_min) * noise - x0))
            firsts.append(first)
        v = self._velocity(*(torch.cat(parts) for parts in zip(*inputs)))
        return torch.stack([torch.nn.functional.mse_loss(v_i[:, first:], target[:, first:])
                            for v_i, target, first in zip(v.split([len(t) for t in targets]), targets, firsts)])

    def sample(self, context_latents: torch.Tensor, latent_frames: int, seed: int) -> torch.Tensor:
        """`I2VDenoiser.denoise` on the v2v condition; with conditioning=reference its oscillation
        guidance and nothing put back, with clean_prefix constant guidance and the context put back."""
        return self.sample_batch(context_latents, latent_frames, [seed])

    def _sample_batch(self, context_latents: torch.Tensor, latent_frames: int, seeds: Sequence[int],
                      noise: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        """`sample` for every context and seed in one batch, the guidance passes in the same forward,
        each continuation's noise from its own seed's generator."""
        batch, channels, clean, h, w = context_latents.shape
        reference = self.conditioning == "reference"
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        x = pack(draw_per_generator(generators, (batch, channels, latent_frames, h, w), self.device))
        cond = condition(context_latents, latent_frames)
        ids = image_ids(batch, latent_frames, h, w, self.device)
        branches = [(self.text, self.vec, cond), (self.null_text, self.null_vec, cond),
                    (self.null_text, self.null_vec, torch.zeros_like(cond))]
        text = torch.cat([b[0].expand(batch, -1, -1) for b in branches])
        vec = torch.cat([b[1].expand(batch, -1) for b in branches])
        conds = torch.cat([b[2] for b in branches])
        times = shifted_timesteps(self.sampling_steps, (h // PATCH) * (w // PATCH), latent_frames)
        for step, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            text_scale, image_scale = self.guidance, self.image_guidance
            if reference:
                text_scale, image_scale = oscillation_scale(text_scale, step), oscillation_scale(image_scale, step)
            n = self.guidance_passes(text_scale, image_scale)  # the passes this step's mix reads
            tt = torch.full((batch * n,), t, device=self.device)
            v = self._velocity(x.repeat(n, 1, 1), tt, ids.repeat(n, 1, 1), conds[: batch * n], text[: batch * n],
                               vec[: batch * n])
            x = x + (t_next - t) * self.mix_guidance(v, text_scale, image_scale)
        out = unpack(x, latent_frames, h, w)
        if not reference:
            out[:, :, :clean] = context_latents
        return out


def with_suffixes(prompt: str, fps: float) -> str:
    """The prompt as upstream's inference script extends it: frame rate, then motion score."""
    from opensora.utils.inference import add_fps_info_to_text, add_motion_score_to_text

    return add_motion_score_to_text(add_fps_info_to_text([prompt], fps=int(fps)), MOTION_SCORE)[0]


def encode_prompts(t5: str, clip: str, prompt: str) -> tuple[torch.Tensor, ...]:
    """T5 (512 tokens, padded, no attention mask) and CLIP pooled embeddings of the prompt and of the
    empty prompt, as upstream's `HFEmbedder`; both encoders are freed afterwards."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    def run(tokenizer, model, key, max_length):
        tokens = tokenizer([prompt, ""], truncation=True, max_length=max_length, padding="max_length",
                           return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=tokens.input_ids, attention_mask=None)[key].float()
        return out[:1], out[1:]

    text, null_text = run(T5Tokenizer.from_pretrained(t5, legacy=True), T5EncoderModel.from_pretrained(t5),
                          "last_hidden_state", T5_TOKENS)
    vec, null_vec = run(CLIPTokenizer.from_pretrained(clip), CLIPTextModel.from_pretrained(clip),
                        "pooler_output", 77)
    return text, null_text, vec, null_vec
