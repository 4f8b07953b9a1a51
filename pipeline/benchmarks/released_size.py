"""Open-Sora and SkyReels-V2 at real size with random weights (speed and memory do not depend on weight
values): the stages' own backend, adapter and optimizer at a preset's clip shape, timed piece by piece.
At the backends' tiny size the same measurement runs on the CPU (the tests)."""
from __future__ import annotations

import contextlib
import functools
import statistics
import time
from pathlib import Path

import torch

from ..adaptation import make_adapter
from ..adaptation.batched_lora import BatchedLora
from ..adaptation.trainer import synchronize
from ..config import Config, load_config
from ..models import default_device, load_backend
from .ltx_video import count_flops, matmul_peak_tflops, peak_memory_gib, time_stages, write_operator_table


def _timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def text_encoders(backend_name: str) -> dict[str, float]:
    """A T5-XXL encoder (UMT5-XXL's vocabulary for SkyReels-V2, and CLIP-L for v2.0) of real size, random,
    bf16: one prompt encoded, then freed."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokens = 300 if backend_name == "opensora-v1.3" else 512
    vocabulary = 256384 if backend_name == "skyreels-v2" else 32128
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu", vocab_size=vocabulary)).to(torch.bfloat16).eval()
        ids = torch.randint(0, vocabulary, (1, tokens))
    with torch.no_grad():
        t5(input_ids=ids)  # warm-up
        _, seconds = _timed(functools.partial(t5, input_ids=ids), torch.device("cuda"))
    result = {"t5_params_b": round(sum(p.numel() for p in t5.parameters()) / 1e9, 2), "t5_encode_s": round(seconds, 3)}
    del t5
    if backend_name == "opensora-v2.0":
        with torch.device("cuda"):
            clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77)).to(torch.bfloat16)
            ids = torch.randint(0, 49408, (1, 77))
        with torch.no_grad():
            clip(input_ids=ids)
            _, seconds = _timed(functools.partial(clip, input_ids=ids), torch.device("cuda"))
        result["clip_encode_s"] = round(seconds, 4)
        del clip
    result["text_peak_gib"] = round(peak_memory_gib(torch.device("cuda")), 1)
    torch.cuda.empty_cache()
    return result


def random_weights(config: Config, size: str) -> Config:
    """The preset's model with random weights at `size` ("full": the released size, or "tiny") and
    no checkpoints, text encoders or prompt to load."""
    for key, value in dict(pretrained="", vae="", text_encoder="", clip_encoder="", prompt="", size=size).items():
        config = config.with_setting(f"model.{key}", value)
    return config


def stage_clips(config_path: str, overrides: dict[str, str], workdir: Path, clips: int, size: str = "full"
                ) -> dict[str, dict]:
    """The baseline and adapt stages themselves (MLflow store, videos, scoring) on `clips` synthetic
    clips of the preset's shape, its model with random weights: `time_stages`'s figures."""
    from ..data.preprocess import preprocess  # here, not at the top: bench-backend alone runs without PyAV

    settings = {"experiment": "stage-clips", "data.source": "synthetic", "data.output_dir": str(workdir / "clips"),
                "data.train_clips": "0", "data.test_clips": str(clips), "data.num_clips": str(clips)}
    config = random_weights(load_config(config_path, {**overrides, **settings}), size)
    preprocess(config.data)
    return time_stages(config, lambda: load_backend(config), workdir)


def measure(config_path: str, overrides: dict[str, str], steps: int = 8, profile_dir: Path | None = None,
            size: str = "full") -> dict[str, object]:
    """Build, encode, adapt `steps` steps (the median of all but the first two, which compile and record
    the CUDA graphs), reset, sample, decode, and the preset's whole clip from those pieces
    (`clip_figures`). The FLOPs of a step and of a whole sample are counted eagerly on extra runs, the
    MFU against the bf16 matrix-product rate measured in the same run. With `sampling.clips_per_batch` =
    B > 1 (LoRA), the step and the sample are those of B clips together, as the adapt stage runs them
    (`BatchedLora`: each clip its own adapter). With `profile_dir`, the operator tables of two more
    steps (`profile`) and of one sampler step with all its guidance passes (`sample_profile`). `size` is
    model.size: "full" (with the text encoders timed) or "tiny"."""
    if steps < 3:
        raise ValueError(f"--steps {steps}: at least 3 (the first two compile and record, and are not timed)")
    config = random_weights(load_config(config_path, overrides), size)
    d, a, clips = config.data, config.adaptation, config.sampling.clips_per_batch
    result: dict[str, object] = {"config": config_path, "frames": d.frames, "size": f"{d.height}x{d.width}",
                                 "method": a.method, "gradient_checkpointing": config.model.gradient_checkpointing,
                                 "compile": config.model.compile, "deepspeed": a.deepspeed, "clips_per_batch": clips}
    if size == "full":
        result.update(text_encoders(config.model.backend))
    device = default_device()
    backend, result["build_s"] = _timed(lambda: load_backend(config), device)
    if clips > 1 and not backend.batches_clips:
        raise ValueError(f"sampling.clips_per_batch={clips}: {type(backend).__name__} adapts one clip at a time")
    result["transformer_params_b"] = round(sum(p.numel() for p in backend.transformer.parameters()) / 1e9, 2)
    layout = backend.frame_layout(d.frames, d.context, d.height, d.width)
    video = torch.rand(1, 3, d.frames, d.height, d.width, device=device) * 2 - 1
    context, result["encode_context_s"] = _timed(
        lambda: backend.encode(video[:, :, : layout.conditioned_pixel_frames]), device)
    window = context if a.data == "context" else backend.encode(video)
    adapter = BatchedLora(backend, a, clips) if clips > 1 else make_adapter(backend, a)
    _reset_peak(device)
    optimizer, result["optimizer_setup_s"] = _timed(adapter.optimizer, device)
    generator = torch.Generator(device).manual_seed(0)
    clean = max(1, window.shape[2] // 2)  # the v2v_head mask; a mid-sized prefix for the other objectives
    batch = window.expand(a.batch_size, -1, -1, -1, -1)

    def routed(items_per_clip: int):
        """Forwards inside go through each clip's own adapter, routed once as the adapt stage does."""
        return adapter.route(list(range(clips)), items_per_clip) if clips > 1 else contextlib.nullcontext()

    def step():
        if clips > 1:
            loss = backend.training_losses([batch] * clips, [clean] * clips, [generator] * clips).sum()
        else:
            loss = backend.training_loss(batch, clean, generator)
        optimizer.micro_step(loss)
        optimizer.step()

    backend.transformer.train()
    run_name = (f"{config.model.backend}_compile{int(config.model.compile)}_deepspeed{int(a.deepspeed)}"
                f"_clips{clips}.txt")
    with routed(a.batch_size):
        with torch.compiler.set_stance("force_eager"):  # first: beside the CUDA graphs' memory it may not fit
            step_flops = count_flops(step)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _reset_peak(device)
        seconds = [_timed(step, device)[1] for _ in range(steps)]
        if profile_dir is not None:
            result["profile"] = str(Path(profile_dir) / f"step_{run_name}")
            write_operator_table(lambda: (step(), step()), device, Path(result["profile"]))
    backend.transformer.eval()
    peak = matmul_peak_tflops(device)
    result["step_s"] = round(statistics.median(seconds[2:]), 3)
    result["first_step_s"] = round(seconds[0], 3)
    result["step_seconds"] = [round(t, 3) for t in seconds]  # every timed step, compilation and CUDA graph recording included
    result["step_tflop"] = round(step_flops / 1e12, 1)
    result["step_mfu"] = round(step_flops / result["step_s"] / 1e12 / peak, 3)
    result["train_peak_gib"] = round(peak_memory_gib(device), 1)
    _, result["reset_s"] = _timed(adapter.reset, device)  # frees the optimizer, then restores the base weights
    _reset_peak(device)
    contexts = context.expand(clips, *context.shape[1:])
    sample = functools.partial(backend.sample_batch, contexts, layout.latent_frames, list(range(clips)))
    result["sampling_steps"] = backend.sampling_steps
    with routed(1):
        with torch.compiler.set_stance("force_eager"), torch.no_grad():
            sample_flops = count_flops(sample)  # the whole sample: steps may run different numbers of guidance passes
        backend.sample_batch(contexts, layout.latent_frames, list(range(clips, 2 * clips)))  # compiles, if any
        latents, result["sample_s"] = _timed(sample, device)
        if profile_dir is not None:
            result["sample_profile"] = str(Path(profile_dir) / f"sample_{run_name}")
            backend.sampling_steps = 1
            try:
                write_operator_table(sample, device, Path(result["sample_profile"]))
            finally:
                backend.sampling_steps = result["sampling_steps"]
    result["sample_tflop"] = round(sample_flops / 1e12, 1)
    result["sample_mfu"] = round(sample_flops / result["sample_s"] / 1e12 / peak, 3)
    result["guidance_passes"] = backend.guidance_passes()
    _, result["decode_s"] = _timed(lambda: backend.decode(latents[:1], generator), device)  # one clip's
    result["sample_peak_gib"] = round(peak_memory_gib(device), 1)
    result["matmul_peak_tflops"] = round(peak, 1)
    result["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result.update(clip_figures(result, a.steps, clips))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def clip_figures(result: dict[str, object], steps: int, clips: int = 1) -> dict[str, float]:
    """One clip as the stages run the preset, from the pieces `measure` timed: the context encoded
    once, the optimizer set up, `steps` adaptation steps, the reset, and both arms (baseline and
    adapted) sampled and decoded; the set-up, steps, reset and samples shared by the `clips` clips of
    a batch (sampling.clips_per_batch). Both arms cost the adapted arm's sample: the baseline's, without
    the adapter's LoRA layers, is a little cheaper. Model time only: scoring and recording add about
    1% at LTX-Video's shapes (docs/benchmarks.md)."""
    r = result
    group = r["optimizer_setup_s"] + steps * r["step_s"] + r["reset_s"] + 2 * r["sample_s"]
    seconds = r["encode_context_s"] + 2 * r["decode_s"] + group / clips
    tflop = (steps * r["step_tflop"] + 2 * r["sample_tflop"]) / clips
    return {"clip_s": seconds, "clips_per_gpu_hour": 3600 / seconds,
            "clip_mfu": tflop / seconds / r["matmul_peak_tflops"]}
