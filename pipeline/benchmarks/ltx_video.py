"""GPU cost of test-time adaptation at real size, with random weights (speed and memory do not
depend on weight values): LTX-Video 2B and its VAE (Lightricks/LTX-Video-0.9.5's configs).

Every configuration measures the plain reference step (fp32 weights under bf16 autocast, eager,
PyTorch AdamW) and the fast step (bf16 base weights, LoRA in fp32, the transformer blocks compiled
with CUDA graphs as `model.compile` does, fused AdamW) in the same process, against a bf16
matrix-product peak measured in the same run. At the seed shape the eager step is bound by the CPU
issuing ~1,400 kernels per forward, which CUDA graphs replay without the CPU. `stage_clips` times
the baseline and adapt stages themselves, `vae_seconds` the VAE.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one real step: every matmul and
attention kernel of the forward and of the backward that autograd actually ran. Frozen weights get
no weight gradient, so a LoRA step is about forward + input gradients (~2x forward); a full
fine-tuning step adds weight gradients (~3x forward).
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

from ..adaptation.trainer import synchronize
from ..config import Config, load_config
from ..models.base import VideoBackend
from ..models.ltx_video import compile_transformer

LTX_VIDEO_2B = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                    attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096)
LTX_VIDEO_VAE = dict(  # Lightricks/LTX-Video-0.9.5's VAE: 32x space, 8x time, timestep-conditioned decoder
    block_out_channels=(128, 256, 512, 1024, 2048), down_block_types=("LTXVideo095DownBlock3D",) * 4,
    decoder_block_out_channels=(256, 512, 1024), layers_per_block=(4, 6, 6, 2, 2),
    decoder_layers_per_block=(5, 5, 5, 5), spatio_temporal_scaling=(True,) * 4,
    decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True,) * 3,
    upsample_factor=(2, 2, 2), timestep_conditioning=True, spatial_compression_ratio=32, temporal_compression_ratio=8)
TEXT_TOKENS = 128
TIME_SPLIT = ("load_seconds", "encode_seconds", "adapt_seconds", "sample_seconds", "decode_seconds", "metrics_seconds",
              "reference_seconds", "record_seconds", "clip_seconds", "non_model_share")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class Case:
    frames: int
    size: int
    method: str = "lora"  # lora | full
    rank: int = 16
    checkpointing: bool = False

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 8 + 1, self.size // 32, self.size // 32

    @property
    def tokens(self) -> int:
        f, h, w = self.latent_grid
        return f * h * w


@dataclass
class Result:
    case: Case
    path: str  # plain | fast
    step_ms: float
    flops_per_step: float
    tflops: float
    mfu: float
    peak_memory_gb: float
    sample_step_ms: float  # one forward pass of sampling (no grad)
    reset_ms: float
    first_step_s: float  # the first call, compilation included

    def row(self) -> dict:
        return {**asdict(self.case), "tokens": self.case.tokens, **{k: v for k, v in asdict(self).items()
                                                                      if k != "case"}}


def grid(frames: list[int], sizes: list[int], ranks: list[int], methods: list[str],
         checkpointing: list[bool]) -> list[Case]:
    """Every configuration: each LoRA rank (full fine-tuning once), with and without checkpointing, at
    every clip length and size."""
    return [Case(f, s, method, rank, ckpt) for method in methods for ckpt in checkpointing
            for rank in (ranks if method == "lora" else [0]) for f in frames for s in sizes]


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 50) -> float:
    """The bf16 matrix-product rate this GPU reaches, measured now (the MFU denominator); NaN off a GPU."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, device, warmup=5, iters=iters)
    return 2 * n**3 / seconds / 1e12


def peak_memory_gib(device: torch.device) -> float:
    """The most memory torch held on this GPU since its last reset; 0 off a GPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def write_operator_table(fn: Callable[[], object], device: torch.device, path: Path) -> None:
    """torch.profiler's table of the operators `fn` ran, by their own device time (CPU time without a GPU)."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                                  row_limit=40))


def inputs(case: Case, device: torch.device, dtype: torch.dtype, channels: int = 128, text_dim: int = 4096):
    f, h, w = case.latent_grid
    sigmas = torch.full((1, case.tokens), 0.5, device=device)
    sigmas[:, : h * w * max(1, f // 2)] = 0  # the first half of the latent frames is the clean prefix
    return dict(hidden_states=torch.randn(1, case.tokens, channels, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, text_dim, device=device, dtype=dtype),
                timestep=sigmas * 1000, encoder_attention_mask=torch.ones(1, TEXT_TOKENS, device=device),
                num_frames=f, height=h, width=w, rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


def build(config: dict, case: Case, device: torch.device, fast: bool):
    """The transformer (random weights) with LoRA or all weights trainable, its train step and one
    sampling forward. Eager: the fast path compiles after its FLOPs are counted."""
    from peft import LoraConfig

    from ..models.ltx_video import ATTENTION_TARGETS

    with torch.device(device):
        model = LTXVideoTransformer3DModel(**config)
    model.to(torch.bfloat16 if fast else torch.float32).requires_grad_(False)
    if case.checkpointing:
        model.enable_gradient_checkpointing()
    if case.method == "lora":
        model.add_adapter(LoraConfig(r=case.rank, lora_alpha=case.rank, target_modules=ATTENTION_TARGETS))
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
    else:
        model.requires_grad_(True)
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fast or None)
    x = inputs(case, device, torch.bfloat16 if fast else torch.float32, config["in_channels"],
               config["caption_channels"])
    target = torch.randn_like(x["hidden_states"])

    def train_step():
        if fast:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**x)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step():
        if fast:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(**x)

    return model, params, train_step, sample_step


def measure(case: Case, fast: bool, peak: float, device: torch.device, config: dict = LTX_VIDEO_2B) -> Result:
    if device.type == "cuda":
        torch._dynamo.reset()  # the previous configuration's compiled code and CUDA graphs (and its memory)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, params, step, sample_step = build(config, case, device, fast)
    flops = count_flops(step)  # eager: a dispatch mode around compiled code would make it fall back
    if fast:
        compile_transformer(model)
    first_step = median_seconds(step, device, warmup=0, iters=1)  # includes compilation
    seconds = median_seconds(step, device)
    sample_seconds = median_seconds(sample_step, device)
    snapshot = [p.detach().clone() for p in params]  # the trained weights' initial values, kept on the GPU
    reset = median_seconds(lambda: restore(params, snapshot), device)
    peak_gb = peak_memory_gib(device)
    achieved = flops / seconds / 1e12
    return Result(case, "fast" if fast else "plain", seconds * 1e3, flops, achieved, achieved / peak, peak_gb,
                  sample_seconds * 1e3, reset * 1e3, first_step)


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], snapshot: list[torch.Tensor]) -> None:
    torch._foreach_copy_(params, snapshot)


def context_frames(frames: int) -> int:
    """The first half of a clip of 8k+1 frames, itself 8j+1 frames (whole latent frames)."""
    return 8 * ((frames - 1) // 16) + 1


@torch.no_grad()
def vae_seconds(frames: int, size: int, device: torch.device, config: dict = LTX_VIDEO_VAE) -> dict[str, float]:
    """The LTX-Video VAE (random weights, bf16 on a GPU) at real size: encoding the context (the
    first half of the clip, as the stages do) and decoding the whole clip, with the stages' calls."""
    from ..models.ltx_video import LTXVideoBackend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        vae = AutoencoderKLLTXVideo(**config).to(dtype)
        latent = vae.config.latent_channels  # the backend needs a transformer for its patch size only
        transformer = LTXVideoTransformer3DModel(num_layers=0, caption_channels=8, in_channels=latent,
                                                 out_channels=latent)
    null_prompt = (torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool))
    backend = LTXVideoBackend(transformer, vae, FlowMatchEulerDiscreteScheduler(), null_prompt, null_prompt, fps=25.0,
                              device=device, dtype=dtype)
    context = context_frames(frames)
    video = torch.rand(1, 3, frames, size, size) * 2 - 1
    generator = torch.Generator(device).manual_seed(0)
    latents = backend.latents_from(backend.encode(video), generator)
    encode = median_seconds(lambda: backend.encode(video[:, :, :context]), device, warmup=1, iters=3)
    decode = median_seconds(lambda: backend.decode(latents, generator), device, warmup=1, iters=3)
    peak = peak_memory_gib(device)
    return {"frames": frames, "size": size, "context": context, "encode_context_s": encode, "decode_clip_s": decode,
            "peak_gb": peak}


def random_backend(device: torch.device, transformer_config: dict = LTX_VIDEO_2B, vae_config: dict = LTX_VIDEO_VAE,
                   compile: bool | None = None, fps: float = 25.0, **kw):
    """The stages' LTX-Video backend around a transformer and VAE of these configs with random weights
    and random prompt embeddings: bf16 with compiled blocks on a GPU (unless `compile=False`), fp32 on a CPU."""
    from ..models.ltx_video import LTXVideoBackend

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(device):
        transformer = LTXVideoTransformer3DModel(**transformer_config).to(dtype)
        vae = AutoencoderKLLTXVideo(**vae_config).to(dtype)
    prompts = [(torch.randn(1, TEXT_TOKENS, transformer_config["caption_channels"]),
                torch.ones(1, TEXT_TOKENS, dtype=torch.bool)) for _ in range(2)]
    return LTXVideoBackend(transformer, vae, FlowMatchEulerDiscreteScheduler(), *prompts, fps=fps, **kw,
                           device=device, dtype=dtype, compile=cuda if compile is None else compile)


def adaptation_seconds(frames: int, size: int, device: torch.device, clips: int, steps: int = 20,
                       transformer_config: dict = LTX_VIDEO_2B, vae_config: dict = LTX_VIDEO_VAE,
                       profile_dir: Path | None = None) -> dict:
    """LoRA r16 adaptation (the stages' defaults: attention targets, batch 4 noise draws per step) of
    `clips` clips' contexts at once, as the adapt stage runs it: one clip through `adapt_to_clip`,
    several through `BatchedLora` and `adapt_clips_together` (sampling.clips_per_batch). LTX-Video 2B
    with random weights, bf16, compiled blocks on a GPU. Seconds per clip (median of 3 adaptations
    after one that compiles), the FLOPs of one step counted eagerly, and the step's bf16 rate. With
    `profile_dir`, two more timed steps run under torch.profiler and its table of operators (by their
    own device time, or CPU time without a GPU) is written there (`profile`)."""
    from ..adaptation import make_adapter
    from ..adaptation.batched_lora import BatchedLora
    from ..adaptation.trainer import adapt_clips_together, adapt_to_clip

    cuda = device.type == "cuda"
    if cuda:
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    config = load_config(None, {"adaptation.steps": str(steps), "adaptation.lr": "2e-4"}).adaptation

    def adaptation(compile: bool):
        """A fresh backend with the adapter of `clips` clips, and a function adapting them `n` steps."""
        backend = random_backend(device, transformer_config, vae_config, compile=compile)
        layout = backend.frame_layout(frames, context_frames(frames), size, size)
        side = size // backend.spatial_ratio
        # each context's posterior mean and log-variance, as the latent cache holds them
        windows = [torch.randn(1, 2 * transformer_config["in_channels"], layout.latent_context, side, side,
                               device=device) for _ in range(clips)]
        adapter = BatchedLora(backend, config, clips) if clips > 1 else make_adapter(backend, config)

        def adapt(n: int) -> None:
            config.steps = n
            adapter.reset()
            if clips > 1:
                adapt_clips_together(backend, adapter, windows, config, list(range(clips)))
            else:
                adapt_to_clip(backend, adapter, windows[0], config, seed=0)
        return adapt, layout.latent_context * side * side

    # FLOPs on an eager copy (a dispatch mode around compiled code would make it fall back), time as the stages run
    adapt, tokens = adaptation(compile=False)
    flops = count_flops(lambda: adapt(1))
    del adapt
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    adapt, _ = adaptation(compile=cuda)
    seconds = median_seconds(lambda: adapt(steps), device, warmup=1, iters=3)
    peak = matmul_peak_tflops(device)
    step = seconds / steps
    profiled = {}
    if profile_dir is not None:
        path = Path(profile_dir) / f"adaptation_{frames}x{size}_clips{clips}.txt"
        write_operator_table(lambda: adapt(2), device, path)
        profiled["profile"] = str(path)
    return {**profiled, "frames": frames, "size": size, "tokens": tokens, "clips": clips,
            "steps": steps, "adapt_s": seconds, "adapt_s_per_clip": seconds / clips, "step_ms": step * 1e3,
            "flops_per_step": flops, "mfu": flops / step / 1e12 / peak, "matmul_peak_tflops": peak,
            "peak_gb": peak_memory_gib(device)}


@torch.no_grad()
def sampling_seconds(frames: int, size: int, device: torch.device, guidance: float, steps: int = 50,
                     transformer_config: dict = LTX_VIDEO_2B, vae_config: dict = LTX_VIDEO_VAE,
                     batch: int = 1) -> dict:
    """Continuations of `batch` clips in one batch as the baseline samples them (LTXConditionPipeline's
    sampler: posterior draw, context re-noising, linear-quadratic sigmas, guidance in one batched
    forward) with LTX-Video 2B and its VAE's latent layout, random weights, bf16 and compiled blocks
    on a GPU."""
    cuda = device.type == "cuda"
    backend = random_backend(device, transformer_config, vae_config, sampling_steps=steps, guidance=guidance)
    layout = backend.frame_layout(frames, context_frames(frames), size, size)
    side = size // backend.spatial_ratio
    # the posterior's mean and log-variance, as the latent cache holds them
    encodings = torch.randn(batch, 2 * transformer_config["in_channels"], layout.latent_context, side, side,
                            device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(lambda: backend.sample_batch(encodings, layout.latent_frames, list(range(batch))),
                             device, warmup=1, iters=3)
    return {"frames": frames, "size": size, "tokens": layout.latent_frames * side * side, "steps": steps,
            "guidance": guidance, "passes": 2 if guidance > 1 else 1, "batch": batch, "sample_s": seconds,
            "sample_s_per_clip": seconds / batch,
            "peak_gb": peak_memory_gib(device)}


def stage_clips(workdir: Path, clips: int = 4, frames: int = 65, size: int = 256, steps: int = 20,
                sampling_steps: int = 20, transformer_config: dict = LTX_VIDEO_2B,
                vae_config: dict = LTX_VIDEO_VAE, clips_per_batch: int = 1) -> dict[str, dict]:
    """The baseline and adapt stages themselves at real size, MLflow store, mp4s and scoring included:
    LTX-Video 2B and its VAE with random weights (bf16 and compiled on a GPU) on synthetic clips of
    frames x size x size, the first half as context, LoRA r16 for `steps` steps, then sampling,
    `clips_per_batch` clips at a time (sampling.clips_per_batch). Returns `time_stages`'s figures."""
    from ..data.preprocess import preprocess
    from ..models import default_device

    device = default_device()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # a CPU has no bf16 autocast here
    config = load_config(None, {
        "experiment": "stage-clips", "data.output_dir": str(workdir / "clips"), "data.frames": str(frames),
        "data.context": str(context_frames(frames)), "data.height": str(size), "data.width": str(size),
        "data.fps": "25", "data.train_clips": "0", "data.test_clips": str(clips), "data.num_clips": str(clips),
        "model.dtype": str(dtype).removeprefix("torch."), "model.compile": str(cuda).lower(),
        "sampling.steps": str(sampling_steps), "adaptation.steps": str(steps), "adaptation.lr": "2e-4",
        "sampling.clips_per_batch": str(clips_per_batch)})
    preprocess(config.data)
    return time_stages(config, lambda: random_backend(device, transformer_config, vae_config, fps=config.data.fps,
                                                     sampling_steps=sampling_steps, guidance=config.sampling.guidance),
                       workdir)


def time_stages(config: Config, make_backend: Callable[[], VideoBackend], workdir: Path) -> dict[str, dict]:
    """The baseline and adapt stages run on `config`'s preprocessed clips with an MLflow store in
    `workdir`: each arm's mean time split per clip and its clips per hour, leaving out the first
    group of clips (compilation), and a whole clip (`clip`, from `whole_clip`). Each use of the model
    gets its own `make_backend()`: an adapt stage leaves its adapters in the transformer."""
    import mlflow

    previous_store = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        flops = _clip_flops(config, make_backend)
        backend = make_backend()
        arms = {stage: _time_split(config, stage, backend) for stage in ("baseline", "adapt")}
        arms["clip"] = whole_clip(arms, flops, backend.device)
        return arms
    finally:
        mlflow.set_tracking_uri(previous_store)


def whole_clip(arms: dict[str, dict], flops: float, device: torch.device) -> dict[str, float]:
    """A clip as a study pays for it, both arms: seconds (each arm's from its clips per hour, so a
    group's time is shared among its clips), clips per GPU-hour, and the MFU of those seconds
    against the rate measured now (NaN on a CPU)."""
    if any("clips_per_hour" not in arms[stage] for stage in ("baseline", "adapt")):
        raise ValueError("--stage-clips: a whole clip needs more clips than one group (sampling.clips_per_batch)")
    seconds = 3600 / arms["baseline"]["clips_per_hour"] + 3600 / arms["adapt"]["clips_per_hour"]
    peak = matmul_peak_tflops(device)
    return {"seconds": seconds, "clips_per_gpu_hour": 3600 / seconds, "tflop": flops / 1e12,
            "mfu": flops / seconds / 1e12 / peak, "matmul_peak_tflops": peak}


def _clip_flops(config: Config, make_backend: Callable[[], VideoBackend]) -> float:
    """A clip's FLOPs in both stages, everything they compute counted (VAE encode and decode,
    adaptation, sampling, scoring): the first group of clips, eager, on a backend of its own under an
    experiment of its own; the latents it caches are removed, so that the timed baseline encodes its
    contexts too."""
    import shutil

    from ..stages.continuation import run_stage
    from ..tracking.runs import TAG_CLIP

    group = min(config.sampling.clips_per_batch, config.data.num_clips or config.sampling.clips_per_batch)
    counted = config.with_setting("experiment", f"{config.experiment}-flops").with_setting("data.num_clips", group)
    backend = make_backend()
    with torch.compiler.set_stance("force_eager"):
        flops = count_flops(lambda: [run_stage(counted, stage, backend) for stage in ("baseline", "adapt")])
    for stage in ("baseline", "adapt"):
        if len({r.data.tags[TAG_CLIP] for r in _finished_clips(counted.experiment, stage)}) != group:
            raise RuntimeError(f"a clip of the {stage} stage failed while its FLOPs were counted (the messages "
                               "above say why)")
    del backend
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shutil.rmtree(Path(config.data.output_dir) / "latents", ignore_errors=True)
    return flops / group


def _finished_clips(experiment: str, stage: str) -> list:
    """The stage's finished clip runs in the experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    from ..tracking.runs import TAG_KIND, TAG_STAGE, search_all

    experiment_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    return search_all(experiment_id, f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_KIND}` = 'clip' "
                                     f"and attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])


def _time_split(config, stage: str, backend) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from ..stages.continuation import run_stage

    run_stage(config, stage, backend)
    runs = _finished_clips(config.experiment, stage)
    if not runs:
        raise RuntimeError(f"no clip of the {stage} stage finished (the messages above say why)")
    first = config.sampling.clips_per_batch  # the first group compiles
    timed = [r.data.metrics for r in runs[first:]] or [r.data.metrics for r in runs]
    split = {key: statistics.mean(m[key] for m in timed) for key in TIME_SPLIT if key in timed[0]}
    ends = sorted(r.info.end_time for r in runs)  # ms; a clip's run ends once it is recorded
    if len(ends) > first and ends[-1] > ends[first - 1]:
        split["clips_per_hour"] = 3600e3 * (len(ends) - first) / (ends[-1] - ends[first - 1])
    files = [f for r in runs for f in artifact_files(MlflowClient(), r.info.run_id)]
    return {**split, "clips": len(timed), "context_cached": statistics.mean(m["context_cached"] for m in timed),
            "bytes_per_clip": sum(f.file_size for f in files) / len(runs),
            "weight_bytes_per_clip": sum(f.file_size for f in files if f.path.endswith(WEIGHT_SUFFIXES)) / len(runs)}


def artifact_files(client, run_id: str, path: str | None = None) -> list:
    """Every file a run logged (mlflow FileInfo: path, file_size), in sub-folders too."""
    files = []
    for info in client.list_artifacts(run_id, path):
        files += artifact_files(client, run_id, info.path) if info.is_dir else [info]
    return files


def evaluation_seconds(clips: int, frames: int, size: int, device: torch.device, chunk: int = 512) -> dict:
    """Seconds to score clips x frames x size^2 RGB frames, batched on `device`: PSNR, SSIM
    (gpu_metrics), LPIPS and FloLPIPS with randomly initialised AlexNet and RAFT-small (timing only:
    their values are never reported), and FVD's I3D features when its weights are there (there is no
    random I3D: it exists only as StyleGAN-V's TorchScript file)."""
    import lpips
    from torchvision.models.optical_flow import raft_small

    from ..evaluation.flolpips import flolpips_tensors
    from ..evaluation.fvd import i3d_features, load_i3d
    from ..evaluation.gpu_metrics import psnr, ssim
    from ..evaluation.weights import WEIGHTS, WeightsUnavailable

    generator = torch.Generator(device).manual_seed(0)
    shape = (clips * frames, 3, size, size)
    truth = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)
    prediction = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).to(device).eval()
    flow = raft_small().to(device).eval()

    @torch.no_grad()
    def score():
        for start in range(0, shape[0], chunk):
            p, t = prediction[start:start + chunk].float(), truth[start:start + chunk].float()
            psnr(p, t), ssim(p, t), net(p / 127.5 - 1, t / 127.5 - 1)
            flolpips_tensors(p / 127.5 - 1, t / 127.5 - 1, net, flow)

    result = {"clips": clips, "frames": frames, "size": size, "seconds": median_seconds(score, device, warmup=1,
                                                                                         iters=3)}
    try:
        i3d = load_i3d(WEIGHTS["i3d"].verified("fvd"), device)
    except WeightsUnavailable as exc:
        return {**result, "fvd_seconds": None, "fvd": str(exc)}
    videos = prediction.view(clips, frames, 3, size, size).permute(0, 1, 3, 4, 2)
    result["fvd_seconds"] = median_seconds(lambda: [i3d_features(i3d, videos[i:i + 8], device)
                                                    for i in range(0, clips, 8)], device, warmup=1, iters=3)
    return result


def format_table(results: list[Result], peak: float) -> str:
    lines = [f"bf16 matmul peak measured in this run: {peak:.0f} TFLOP/s", "",
             "| frames | px | tokens | method | rank | ckpt | path | step ms | GFLOP/step | TFLOP/s | MFU | "
             "peak GB | sample fwd ms | reset ms | first step s |", "|" + "---|" * 15]
    for r in results:
        c = r.case
        lines.append(f"| {c.frames} | {c.size} | {c.tokens} | {c.method} | {c.rank if c.method == 'lora' else '-'} | "
                     f"{'yes' if c.checkpointing else 'no'} | {r.path} | {r.step_ms:.1f} | {r.flops_per_step / 1e9:.0f} "
                     f"| {r.tflops:.0f} | {100 * r.mfu:.1f}% | {r.peak_memory_gb:.1f} | {r.sample_step_ms:.1f} | "
                     f"{r.reset_ms:.2f} | {r.first_step_s:.1f} |")
    return "\n".join(lines)


def run_bench(cases: list[Case], paths: tuple[str, ...] = ("plain", "fast"), out: str | None = None) -> list[Result]:
    device = torch.device("cuda")
    peak = matmul_peak_tflops(device)
    results = []
    for case in cases:
        for path in paths:
            try:
                result = measure(case, path == "fast", peak, device)
            except Exception as exc:  # out of memory, above all: the other configurations still run
                print(f"{case} {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
                continue
            results.append(result)
            print(json.dumps(result.row()), flush=True)
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(result.row()) + "\n")
    print(format_table(results, peak), flush=True)
    return results
