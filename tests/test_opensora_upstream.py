"""Integration tests against the real upstream Open-Sora classes (tiny random configs).

They run where the upstream `opensora` package is installed (one version per environment:
docs/opensora.md) and are skipped elsewhere. They use `model.portable_kernels`, so they run on a CPU
and on torch builds that upstream's compiled kernels (xformers, flash-attn, Liger) do not support.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.adaptation.full import FullFinetune
from pipeline.adaptation.lora import LoraAdapter
from pipeline.adaptation.trainer import adapt_to_clip
from pipeline.config import load_config
from pipeline.models import load_backend
from pipeline.models.upstream import MARKER, require_opensora

ROOT = Path(__file__).resolve().parents[1]


def _installed_version() -> str | None:
    for version in MARKER:
        try:
            require_opensora(version, portable_kernels=True)
            return version
        except ImportError:
            continue
    return None


VERSION = _installed_version()
pytestmark = pytest.mark.skipif(VERSION is None, reason="the upstream opensora package is not installed here "
                                                        "(docs/opensora.md); these tests need it")
PRESET = {"v1.3": "conf/opensora13-naive.yaml", "v2.0": "conf/opensora20-lora.yaml"}
CUDA = torch.cuda.is_available()


def tiny_preset(base: Path, **adaptation) -> Path:
    """The version's preset with the model at tiny size (random weights) and small generated clips."""
    config = yaml.safe_load((ROOT / PRESET[VERSION]).read_text())
    config["experiment"] = f"tiny-{VERSION}"
    config["data"] = {"source": "synthetic", "output_dir": str(base / "data"), "frames": 17,
                      "context": 8 if VERSION == "v1.3" else 9, "height": 32, "width": 32, "fps": 24,
                      "train_clips": 2, "test_clips": 2, "num_clips": 2, "split": "test"}
    config["model"].update(pretrained="", vae="", text_encoder="", clip_encoder="", size="tiny", portable_kernels=True,
                           dtype="bfloat16" if CUDA else "float32", compile=False)
    config["sampling"]["steps"] = 2
    config["adaptation"].update(steps=2, warmup=1, **adaptation)
    config["evaluation"] = {"lpips": False}
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return tiny_preset(tmp_path_factory.mktemp(f"opensora-{VERSION}"))


def _clip(backend, layout) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, layout.frames, 32, 32, generator=generator) * 2 - 1


def test_lora_targets_and_clean_context(config_path):
    """What is Open-Sora's own (0 steps and the reset are in tests/test_backend_contract.py): LoRA on
    every target, the clean prefix kept, adaptation changes the continuation."""
    config = load_config(config_path, {"adaptation.method": "lora", "model.conditioning": "clean_prefix"})
    backend = load_backend(config)
    layout = backend.frame_layout(config.data.frames, config.data.context, 32, 32)
    context = backend.encode(_clip(backend, layout)[:, :, : layout.conditioned_pixel_frames])
    assert context.shape[2] == layout.latent_context
    baseline = backend.sample(context, layout.latent_frames, seed=3)
    assert baseline.shape[2] == layout.latent_frames
    assert torch.equal(baseline[:, :, : layout.latent_context], context)  # the prefix is the given context

    adapter = LoraAdapter(backend, config.adaptation)
    names = [n for n, m in backend.transformer.named_modules() if hasattr(m, "lora_A")]
    for target in backend.lora_targets(config.adaptation.targets):
        assert any(n.endswith(target) for n in names), f"no LoRA layer on {target}"
    adapt_to_clip(backend, adapter, context, config.adaptation, seed=0)
    assert not torch.equal(backend.sample(context, layout.latent_frames, seed=3), baseline)


def test_full_finetuning_restores_base_weights_between_clips(config_path):
    """Two clips in a row; on a GPU through DeepSpeed ZeRO-2 (a new engine per clip)."""
    config = load_config(config_path, {"adaptation.method": "full", "adaptation.objective": "v2v_head",
                                       "adaptation.zero_stage": "2", "adaptation.lr": "1e-3"})
    backend = load_backend(config)
    layout = backend.frame_layout(config.data.frames, config.data.context, 32, 32)
    video = _clip(backend, layout)
    context = backend.encode(video[:, :, : layout.conditioned_pixel_frames])
    baseline = backend.sample(context, layout.latent_frames, seed=3)
    finetune = FullFinetune(backend, config.adaptation)
    base = [p.detach().clone() for p in finetune.parameters()]
    for _ in range(2):
        finetune.reset()
        adapt_to_clip(backend, finetune, backend.encode(video), config.adaptation, seed=0)
        changed = any(not torch.equal(p, b) for p, b in zip(finetune.parameters(), base))
        assert changed, "full fine-tuning left every weight unchanged"
    finetune.reset()
    assert all(torch.equal(p, b) for p, b in zip(finetune.parameters(), base))
    assert torch.equal(backend.sample(context, layout.latent_frames, seed=3), baseline)


def test_preset_runs_end_to_end_through_mlflow_run(tmp_path):
    """preprocess, then `mlflow run . -e baseline/adapt -P config=<the preset at tiny size>`."""
    config_path = tiny_preset(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "pipeline", "preprocess", "--config", str(config_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    for entry in ("baseline", "adapt"):
        result = subprocess.run([sys.executable, "-m", "mlflow", "run", ".", "-e", entry, "-P", f"config={config_path}",
                                 "--env-manager", "local", "--experiment-name", f"tiny-{VERSION}"],
                                cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(f"tiny-{VERSION}")
    clips = MlflowClient().search_runs([experiment.experiment_id], "tags.`tta.kind` = 'clip'")
    assert sorted(c.data.tags["tta.stage"] for c in clips) == ["adapt", "adapt", "baseline", "baseline"]
    assert all(c.info.status == "FINISHED" and "psnr" in c.data.metrics for c in clips), \
        [c.data.tags.get("tta.error") for c in clips]
    parent = MlflowClient().search_runs([experiment.experiment_id], "tags.`tta.kind` = 'stage' and "
                                                                    "tags.`tta.stage` = 'adapt'")[0]
    assert parent.data.params["model.backend"] == f"opensora-{VERSION}"
    assert parent.data.tags["tta.conditioned_pixel_frames"] == ("5" if VERSION == "v1.3" else "9")


class NullCaptionEncoder:
    """Upstream's T5Encoder interface for the empty prompt, which both sides condition on the model's
    learned null caption (no T5 weights or tokenizer can be fetched here)."""

    def __init__(self, backend):
        self.backend = backend

    def tokenize_fn(self, prompts):
        return {}

    def encode(self):
        return {"y": self.backend.caption, "mask": self.backend.caption_mask}

    def null(self, n):
        return self.backend.null_caption.expand(n, -1, -1, -1)


def sensitive(backend):
    """The tiny random model with its zero-initialised layers (condition embedders, gates, final
    layer) made random and a caption unlike the null one, so that every guidance branch and every
    dropped condition changes the output: an equality then means something."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in backend.transformer.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    if VERSION == "v1.3":
        backend.caption = torch.randn(backend.null_caption.shape, generator=generator)
    else:
        backend.text, backend.null_text, backend.vec, backend.null_vec = (
            torch.randn(x.shape, generator=generator) for x in (backend.text, backend.null_text, backend.vec,
                                                                 backend.null_vec))
    return backend


def twelve_step_setup(config_path, conditioning: str = "reference"):
    """The randomised tiny backend at 12 sampling steps (past the 10 of full oscillation guidance),
    with the layout and encoded context of the test clip: (config, backend, layout, context)."""
    config = load_config(config_path, {"sampling.steps": "12", "model.conditioning": conditioning})
    backend = sensitive(load_backend(config))
    layout = backend.frame_layout(config.data.frames, config.data.context, 32, 32)
    return config, backend, layout, backend.encode(_clip(backend, layout)[:, :, : layout.conditioned_pixel_frames])


@pytest.mark.parametrize("image_guidance, passes", [("preset", [3] * 11 + [1]), ("1.0", [2] * 11 + [1])])
def test_sampler_runs_only_the_guidance_passes_its_mix_reads(config_path, monkeypatch, image_guidance, passes):
    """Upstream's oscillation guidance sets both scales to 1 on odd steps from the 10th, where the
    mix is the text+image pass alone; an image scale of 1 cancels the neither pass. Those steps run
    fewer passes, with the same samples as running all three (and as upstream's:
    test_v13_baseline_equals_upstream_rflow_sample, test_v20_baseline_equals_upstream_i2v_denoiser)."""
    _, backend, layout, context = twelve_step_setup(config_path)
    if image_guidance != "preset":
        backend.image_guidance = float(image_guidance)
    contexts, seeds = context.expand(2, -1, -1, -1, -1), [3, 4]
    batches = []
    hook = backend.transformer.register_forward_pre_hook(lambda module, args, kwargs: batches.append(
        (args[0] if args else kwargs["img"]).shape[0]), with_kwargs=True)
    try:
        fewer = backend.sample_batch(contexts, layout.latent_frames, seeds)
    finally:
        hook.remove()
    assert batches == [2 * n for n in passes]  # two clips per pass
    monkeypatch.setattr(type(backend), "guidance_passes", lambda self, *scales: 3)
    torch.testing.assert_close(fewer, backend.sample_batch(contexts, layout.latent_frames, seeds), atol=1e-5, rtol=1e-5)


def _shape_args(backend, latent_frames: int, h: int, w: int) -> dict:
    from pipeline.models.opensora_v13 import SPATIAL, decoded_frames

    return {"height": torch.tensor([float(h * SPATIAL)]), "width": torch.tensor([float(w * SPATIAL)]),
            "num_frames": torch.tensor([float(decoded_frames(latent_frames))]),
            "fps": torch.tensor([float(backend.fps)])}


@pytest.mark.skipif(VERSION != "v1.3", reason="Open-Sora v1.3 only")
def test_v13_baseline_equals_upstream_rflow_sample(config_path):
    """model.conditioning=reference: our baseline is upstream's RFLOW.sample on the v2v path, as
    configs/opensora-v1-3/inference/v2v.py runs it (SDEdit, oscillation guidance, image weight
    scaling), for the same noise; 12 steps reach past the 10 of full oscillation guidance."""
    from opensora.schedulers.rf import RFLOW

    config, backend, layout, context = twelve_step_setup(config_path)
    ours = backend.sample(context, layout.latent_frames, seed=3)

    batch, channels, clean, h, w = context.shape
    torch.manual_seed(3)  # upstream draws from the global generator: the same stream as ours on a CPU
    z = torch.randn(batch, channels, layout.latent_frames, h, w)
    ref, cond_mask = torch.zeros_like(z), torch.zeros_like(z)
    ref[:, :, :clean], cond_mask[:, :, :clean] = context, 1
    scheduler = RFLOW(num_sampling_steps=12, cfg_scale=7.5, use_timestep_transform=True, scale_image_weight=True,
                      initial_image_scale=1.0)
    theirs = scheduler.sample(backend.transformer, NullCaptionEncoder(backend), z=z, prompts=[""], device="cpu",
                              additional_args=_shape_args(backend, layout.latent_frames, h, w), mask=None,
                              guidance_scale=7.5, image_cfg_scale=5.0, progress=False, z_cond=ref,
                              z_cond_mask=cond_mask, mask_index=list(range(clean)), use_sdedit=True,
                              use_oscillation_guidance_for_text=True, use_oscillation_guidance_for_image=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    clean_prefix = twelve_step_setup(config_path, "clean_prefix")[1]
    assert not torch.allclose(clean_prefix.sample(context, layout.latent_frames, seed=3), theirs, atol=1e-2)


def test_compiled_blocks_match_eager(config_path):
    """model.compile: each transformer block through torch.compile, the blocks of one kind (v1.3
    spatial and temporal, v2.0 double and single) sharing one graph; the same samples and gradients
    as the eager model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backends = []
    for compile in ("false", "true"):
        torch.manual_seed(0)
        backends.append(load_backend(load_config(config_path, {"model.compile": compile})))
    config = load_config(config_path)
    layout = backends[0].frame_layout(config.data.frames, config.data.context, 32, 32)
    video = _clip(backends[0], layout)
    context = backends[0].encode(video[:, :, : layout.conditioned_pixel_frames])
    eager = backends[0].sample(context, layout.latent_frames, seed=3)
    upstream_graphs = counters["stats"]["unique_graphs"]  # v2.0 compiles its timestep embedding itself
    compiled = backends[1].sample(context, layout.latent_frames, seed=3)
    assert counters["stats"]["unique_graphs"] - upstream_graphs == 2  # one per kind of block, whatever the depth
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    grads = []
    for backend in backends:
        backend.transformer.requires_grad_(True)
        backend.training_loss(backend.encode(video), layout.latent_context, torch.Generator().manual_seed(0)).backward()
        last_blocks = getattr(backend.transformer, "temporal_blocks" if VERSION == "v1.3" else "single_blocks")
        grads.append([p.grad for p in last_blocks[-1].parameters()])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)


def test_compiled_blocks_take_up_lora_injected_after_a_compiled_sample(config_path):
    """The stages sample the baseline before an adapter exists; the compiled blocks must then run the
    LoRA layers PEFT puts into them, as the eager model does."""
    overrides = {"adaptation.method": "lora", "adaptation.lr": "1e-2"}
    backends, baselines, adapted = [], [], []
    for compile in ("false", "true"):
        torch.manual_seed(0)
        backends.append(load_backend(load_config(config_path, {**overrides, "model.compile": compile})))
    config = load_config(config_path, overrides)
    layout = backends[0].frame_layout(config.data.frames, config.data.context, 32, 32)
    context = backends[0].encode(_clip(backends[0], layout)[:, :, : layout.conditioned_pixel_frames])
    for backend in backends:
        baselines.append(backend.sample(context, layout.latent_frames, seed=3))
        adapt_to_clip(backend, LoraAdapter(backend, config.adaptation), context, config.adaptation, seed=0)
        adapted.append(backend.sample(context, layout.latent_frames, seed=3))
    assert (adapted[0] - baselines[0]).abs().max() > 1e-2  # the adapter changes the sample
    torch.testing.assert_close(adapted[1], adapted[0], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(VERSION != "v1.3", reason="Open-Sora v1.3 only")
@pytest.mark.parametrize("condition", ["keep", "cond", "text", "null"])
def test_v13_adaptation_loss_equals_upstream_training_losses(config_path, condition):
    """Our loss is RFlowScheduler.training_losses on the v2v_head mask for the same latents, t, noise
    and dropped condition."""
    from opensora.schedulers.rf.rectified_flow import RFlowScheduler

    config = load_config(config_path)
    backend = sensitive(load_backend(config))
    layout = backend.frame_layout(config.data.frames, config.data.context, 32, 32)
    window = backend.encode(_clip(backend, layout))
    clean, t = window.shape[2] // 2, torch.tensor([310.0])
    noise = torch.randn(window.shape, generator=torch.Generator().manual_seed(0))
    ours = backend.reference_loss(window, clean, t, noise, condition)

    class Trained(torch.nn.Module):  # training_losses reads the model through DDP's `.module`
        def __init__(self, model):
            super().__init__()
            self.module = model

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    scheduler = RFlowScheduler(use_timestep_transform=True, sample_method="logit-normal",
                               drop_condition={condition: 1.0})
    kwargs = {"y": backend.caption, "mask": backend.caption_mask, **_shape_args(backend, window.shape[2], 4, 4)}
    terms = scheduler.training_losses(Trained(backend.transformer), window.clone(), model_kwargs=kwargs, noise=noise,
                                      t=t, mask_index=list(range(clean)), x_gt=window, text_uncond_prob=0.0)
    torch.testing.assert_close(ours, terms["loss"].mean(), atol=1e-5, rtol=1e-5)
    others = [backend.reference_loss(window, clean, t, noise, c) for c in ("keep", "cond", "text", "null")]
    assert len({round(float(x), 6) for x in others}) == 4  # each dropped condition is a different loss


@pytest.mark.skipif(VERSION != "v2.0", reason="Open-Sora v2.0 only")
def test_v20_baseline_equals_upstream_i2v_denoiser(config_path):
    """model.conditioning=reference: our baseline is I2VDenoiser.denoise as configs/diffusion/inference/
    256px.py runs it (oscillation guidance on text and image) for the same noise, with the inputs
    `api_fn` prepares for v2v_head; 12 steps reach past the 10 of full oscillation guidance."""
    try:
        from opensora.utils.sampling import I2VDenoiser, get_schedule
    except ImportError as exc:  # it pulls in upstream's dataset code (torchvision.io.video)
        pytest.skip(f"opensora.utils.sampling does not import here: {exc}")
    from pipeline.models.opensora_v20 import image_ids, pack, unpack

    config, backend, layout, context = twelve_step_setup(config_path)
    ours = backend.sample(context, layout.latent_frames, seed=3)

    batch, channels, clean, h, w = context.shape
    frames = layout.latent_frames
    z = torch.randn(batch, channels, frames, h, w, generator=torch.Generator().manual_seed(3))  # upstream's get_noise
    masks, masked_ref = torch.zeros(batch, 1, frames, h, w), torch.zeros_like(z)
    masks[:, :, :clean], masked_ref[:, :, :clean] = 1, context
    inputs = dict(img=pack(z).repeat(3, 1, 1), img_ids=image_ids(3 * batch, frames, h, w, torch.device("cpu")),
                  txt=torch.cat([backend.text, backend.null_text, backend.null_text]),
                  txt_ids=torch.zeros(3 * batch, backend.text.shape[1], 3),
                  y_vec=torch.cat([backend.vec, backend.null_vec, backend.null_vec]), masks=masks,
                  masked_ref=masked_ref, sigma_min=1e-5, guidance_img=config.sampling.image_guidance)
    timesteps = get_schedule(12, (h * w) // 4, frames, shift=True)
    theirs = I2VDenoiser().denoise(backend.transformer, **inputs, timesteps=timesteps,
                                   guidance=config.sampling.guidance, text_osci=True, image_osci=True,
                                   scale_temporal_osci=False, patch_size=2)
    torch.testing.assert_close(ours, unpack(theirs, frames, h, w), atol=1e-4, rtol=1e-4)
    clean_prefix = twelve_step_setup(config_path, "clean_prefix")[1]
    assert not torch.allclose(clean_prefix.sample(context, frames, seed=3), ours, atol=1e-2)


@pytest.mark.skipif(VERSION != "v2.0", reason="Open-Sora v2.0 only")
def test_v20_schedule_matches_upstream_get_schedule():
    try:
        from opensora.utils.sampling import get_schedule
    except ImportError as exc:  # it pulls in upstream's dataset code (torchvision.io.video)
        pytest.skip(f"opensora.utils.sampling does not import here: {exc}")
    from pipeline.models.opensora_v20 import shifted_timesteps

    for steps, tokens, frames in [(25, 256, 17), (50, 1024, 33), (4, 64, 5)]:
        ours = shifted_timesteps(steps, tokens, frames)
        assert ours == pytest.approx(get_schedule(steps, tokens, frames, shift=True), abs=1e-6)
