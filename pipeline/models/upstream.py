"""Access to the upstream `opensora` package (github.com/hpcaitech/Open-Sora), which is not on PyPI.

v1.3 and v2.0 live on different branches of one repository and both install as `opensora`, so
each needs its own environment; docs/opensora.md gives the install and checkpoint steps.

Upstream calls compiled kernels that exist only for some machines: xformers' memory-efficient
attention (v1.3 cross-attention; CUDA only, and only for the torch build it was compiled against),
flash-attn and Liger's Triton RMSNorm (v2.0; CUDA only). `model.portable_kernels=true` routes those
calls through the same math in plain torch, so the upstream models also run on a CPU or a newer torch.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

from ..config import Config
from .base import PackageMissing, VideoBackend, default_device

INSTALL = {
    "v1.3": "git clone -b opensora/v1.3 https://github.com/hpcaitech/Open-Sora open-sora-v1.3 && "
            "pip install --no-deps -e open-sora-v1.3 && pip install --no-deps xformers timm mmengine addict yapf "
            "termcolor platformdirs rotary-embedding-torch beartype ftfy colossalai galore-torch bitsandbytes",
    "v2.0": "git clone https://github.com/hpcaitech/Open-Sora open-sora-v2.0 && "
            "pip install --no-deps -e open-sora-v2.0 && pip install --no-deps flash-attn liger-kernel mmengine addict "
            "yapf termcolor platformdirs ftfy colossalai galore-torch bitsandbytes omegaconf openai",
}
# a module that exists on one branch only tells the two apart
MARKER = {"v1.3": "opensora.models.stdit.stdit3", "v2.0": "opensora.models.mmdit.model"}


OSCILLATION_STEPS = 10  # upstream's force_num: full guidance for this many steps, then on every other step


def oscillation_scale(scale: float, step: int) -> float:
    """Upstream's `get_oscillation_gs` (both versions): the full scale for the first steps, then on
    even steps only."""
    return scale if step < OSCILLATION_STEPS or step % 2 == 0 else 1.0


class OpenSoraMissing(PackageMissing):
    pass


class OpenSoraBackend(VideoBackend):
    """What the two Open-Sora backends share: the VAE calls (upstream's encode/decode signature),
    upstream's gradient checkpointing and guidance mix."""

    guidance: float
    image_guidance: float

    @classmethod
    def reference_deviations(cls, config: Config) -> list[str]:
        return ["clean prefix"] if config.model.opensora.conditioning != "reference" else []

    @staticmethod
    def settings(config: Config) -> dict:
        """The `build` arguments both versions read from the config, beside their checkpoints."""
        m, s = config.model, config.sampling
        return dict(prompt=m.prompt, size=m.size, portable_kernels=m.opensora.portable_kernels,
                    conditioning=m.opensora.conditioning, fps=config.data.fps, sampling_steps=s.steps,
                    guidance=s.guidance, image_guidance=s.image_guidance, timesteps=config.adaptation.timesteps,
                    device=default_device(), dtype=getattr(torch, m.dtype))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video.to(self.device, self.dtype), sample_posterior=False).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype)).clamp(-1, 1).float()

    def guidance_passes(self, text_scale: float | None = None, image_scale: float | torch.Tensor | None = None) -> int:
        """The passes a step's guidance mix reads, in the order text+image, image only, neither (the
        configured scales unless this step's are given). With both scales 1 (no guidance, or the odd
        steps of upstream's oscillation guidance) the mix is the text+image pass alone; with the image
        scale 1 the neither pass cancels."""
        text_scale = self.guidance if text_scale is None else text_scale
        image_scale = self.image_guidance if image_scale is None else image_scale
        if isinstance(image_scale, torch.Tensor) or image_scale != 1:
            return 3
        return 1 if text_scale == 1 else 2

    def mix_guidance(self, velocity: torch.Tensor, text_scale: float | None = None,
                     image_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Upstream's v2v classifier-free guidance over the passes stacked along the batch (the
        configured scales unless this step's are given; as many passes as `guidance_passes` reads)."""
        text_scale = self.guidance if text_scale is None else text_scale
        image_scale = self.image_guidance if image_scale is None else image_scale
        passes = self.guidance_passes(text_scale, image_scale)
        if passes == 1:
            return velocity
        text, image_only, *rest = velocity.chunk(passes)
        neither = rest[0] if rest else image_only
        return neither + image_scale * (image_only - neither) + text_scale * (text - image_only)

    def enable_gradient_checkpointing(self) -> None:
        from opensora.acceleration.checkpoint import set_grad_checkpoint

        set_grad_checkpoint(self.transformer)


def require_opensora(version: str, portable_kernels: bool = False):
    """Import the upstream module that marks `version`, or explain how to install it."""
    if portable_kernels and importlib.util.find_spec("flash_attn") is None:
        sys.modules["flash_attn"] = _portable_flash_attn()  # imported by v2.0 at module level, v1.3 at call time
    try:
        module = importlib.import_module(MARKER[version])
    except ImportError as exc:
        raise OpenSoraMissing(
            f"model.backend=opensora-{version} needs the upstream Open-Sora {version} package "
            f"(importing {MARKER[version]} failed: {exc}). Install it into this environment with:\n"
            f"  {INSTALL[version]}\nsee docs/opensora.md for checkpoints and offline compute nodes"
        ) from exc
    if portable_kernels:
        _use_portable_kernels(version)
    return module


def block_diagonal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float = 0.0,
                             attn_bias=None) -> torch.Tensor:
    """`xformers.ops.memory_efficient_attention` as STDiT3's cross-attention calls it: (1, tokens,
    heads, dim) with samples concatenated and a `BlockDiagonalMask` of their lengths; one SDPA per sample."""
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              dropout_p=p).transpose(1, 2)

    if attn_bias is None:
        return sdpa(q, k, v)
    q_lens = _lengths(attn_bias.q_seqinfo.seqstart_py)
    k_lens = _lengths(attn_bias.k_seqinfo.seqstart_py)
    parts = zip(q.split(q_lens, dim=1), k.split(k_lens, dim=1), v.split(k_lens, dim=1))
    return torch.cat([sdpa(*part) for part in parts], dim=1)


def _lengths(starts: list[int]) -> list[int]:
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


def _use_portable_kernels(version: str) -> None:
    if version == "v1.3":
        import xformers.ops
        from opensora.models.layers import blocks

        ops = types.SimpleNamespace(memory_efficient_attention=block_diagonal_attention, fmha=xformers.ops.fmha)
        blocks.xformers = types.SimpleNamespace(ops=ops)  # only upstream's blocks module sees the replacement
    else:
        from opensora.models.mmdit import layers

        layers.FusedRMSNorm.forward = layers.RMSNorm.forward  # the same RMSNorm without Liger's Triton kernel


def _portable_flash_attn() -> types.ModuleType:
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    def unavailable(*args, **kwargs):  # v2.0's distributed.py imports these; only sequence parallelism calls them
        raise NotImplementedError("upstream sequence parallelism needs the real flash-attn package")

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_func = flash_attn_func
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward = interface._flash_attn_backward = unavailable
    module.flash_attn_interface = interface
    sys.modules["flash_attn.flash_attn_interface"] = interface
    return module
