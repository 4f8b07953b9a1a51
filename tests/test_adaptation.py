"""The protocol's guarantees: 0 steps = baseline bitwise; nothing in context mode depends on the
target frames; per-clip, per-sample seeds shared by the arms; the sham arm adapts on its partner's
context; reset restores base and adapter exactly."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.adaptation.lora import LoraAdapter
from pipeline.adaptation.optim import TorchAdamW
from pipeline.adaptation.trainer import NonFiniteLoss, adapt_to_clip, train
from pipeline.config import ConfigError, load_config
from pipeline.data.manifest import read_manifest, select_clips
from pipeline.models import load_backend
from pipeline.evaluation.metrics import frame_metrics
from pipeline.stages.continuation import ClipFrames, Continuer, sham_partners


def _records(config):
    return select_clips(read_manifest(config.data.manifest), "test", 0)


def _clip(config, continuer, index=0, partner=None) -> ClipFrames:
    records = _records(config)
    return continuer.load_inputs(config.data.manifest, records[index],
                                 None if partner is None else records[partner])


def _with_frames(clip: ClipFrames, frames=None, partner_frames=None) -> ClipFrames:
    return dataclasses.replace(clip, frames=clip.frames if frames is None else frames,
                               partner_frames=clip.partner_frames if partner_frames is None else partner_frames)


def _noise_after(frames, K):
    """The clip with its target frames [K, T) replaced by noise."""
    changed = frames.copy()
    changed[K:] = np.random.default_rng(1).integers(0, 256, changed[K:].shape, dtype=np.uint8)
    return changed


def test_zero_steps_reproduces_the_baseline_bitwise(prepared):
    config = load_config(prepared, {"adaptation.steps": "0", "sampling.samples": "2"})
    baseline = Continuer(config, "baseline")
    adapted = Continuer(config, "adapt")  # a separate model with a LoRA adapter attached
    clip = _clip(config, baseline)
    out_b, out_a = baseline.run(clip), adapted.run(clip)
    assert np.array_equal(out_a.first, out_b.first)
    assert out_a.per_sample == out_b.per_sample and out_a.metrics["psnr"] == out_b.metrics["psnr"]
    assert len(adapted.adapter.parameters()) > 0


def test_context_mode_never_sees_the_target_frames(prepared):
    """In context mode, replacing the target frames [K, T) changes nothing the model produces (adapted
    and sampled); in oracle mode it does, which shows the check can fail."""
    config = load_config(prepared, {"adaptation.steps": "3", "adaptation.lr": "0.01"})
    K = config.data.context
    continuer = Continuer(config, "adapt")
    clip = _clip(config, continuer)
    changed = _with_frames(clip, _noise_after(clip.frames, K))
    assert np.array_equal(continuer.run(clip).first, continuer.run(changed).first)
    oracle = Continuer(load_config(prepared, {"adaptation.steps": "3", "adaptation.lr": "0.01",
                                              "adaptation.data": "oracle"}), "adapt")
    assert not np.array_equal(oracle.run(clip).first, oracle.run(changed).first)


def test_sampling_seeds_are_derived_per_clip_and_sample(prepared):
    """Clips start from their own noise, each of N samples from its own; sample 0 is the same with
    N=1 or N=2; sampling.seed changes every draw."""
    config = load_config(prepared, {"sampling.samples": "2"})
    continuer = Continuer(config, "baseline")
    two = continuer.run(_clip(config, continuer))
    one = Continuer(load_config(prepared), "baseline").run(_clip(config, continuer))
    assert np.array_equal(two.first, one.first) and two.per_sample["psnr"][0] == one.per_sample["psnr"][0]
    assert two.per_sample["psnr"][0] != two.per_sample["psnr"][1]
    assert two.metrics["psnr"] == pytest.approx(np.mean(two.per_sample["psnr"]))
    assert two.metrics["psnr_best"] == max(two.per_sample["psnr"]) and two.metrics["psnr_sample_sd"] > 0
    same_frames = _clip(config, continuer, 1)
    same_frames = dataclasses.replace(same_frames, frames=_clip(config, continuer, 0).frames)
    assert not np.array_equal(continuer.run(same_frames).first, two.first)  # another clip id: other noise
    reseeded = Continuer(load_config(prepared, {"sampling.seed": "7"}), "baseline")
    assert not np.array_equal(reseeded.run(_clip(config, continuer)).first, one.first)


def test_sham_arm_adapts_on_its_partners_context_only(prepared):
    config = load_config(prepared, {"adaptation.data": "other", "adaptation.steps": "3", "adaptation.lr": "0.01"})
    K = config.data.context
    continuer = Continuer(config, "adapt")
    clip = _clip(config, continuer, 0, partner=1)
    out = continuer.run(clip).first
    assert np.array_equal(out, continuer.run(_with_frames(clip, partner_frames=_noise_after(clip.partner_frames, K))).first)
    context_changed = clip.partner_frames.copy()
    context_changed[:K] = 255 - context_changed[:K]
    assert not np.array_equal(out, continuer.run(_with_frames(clip, partner_frames=context_changed)).first)


def test_sham_partners_are_a_fixed_derangement_of_the_split(prepared):
    config = load_config(prepared)
    split = _records(config)
    partners = sham_partners(split, seed=0)
    assert all(partners[c.clip_id].clip_id != c.clip_id for c in split)
    assert sorted(p.clip_id for p in partners.values()) == sorted(c.clip_id for c in split)  # one cycle
    assert {k: v.clip_id for k, v in sham_partners(list(reversed(split)), 0).items()} == \
        {k: v.clip_id for k, v in partners.items()}  # independent of order and selection
    with pytest.raises(ValueError, match="at least 2 clips"):
        sham_partners(split[:1], 0)


def test_baseline_scores_the_repeat_last_frame_reference(prepared):
    config = load_config(prepared)
    continuer = Continuer(config, "baseline")
    clip = _clip(config, continuer)
    out = continuer.run(clip)
    K = config.data.context
    expected = frame_metrics(np.repeat(clip.frames[K - 1:K], config.data.frames - K, axis=0), clip.frames[K:])
    assert out.per_frame["repeat_last_psnr"] == pytest.approx(expected["psnr"])
    assert out.metrics["repeat_last_ssim"] == pytest.approx(np.mean(expected["ssim"]))
    assert "vae_recon_psnr" not in out.metrics  # the pixel-space default has no VAE


@pytest.mark.parametrize("method", ["lora", "full"])  # full: plain AdamW on the CPU (DeepSpeed runs on GPUs)
def test_adaptation_changes_the_output(prepared, method):
    config = load_config(prepared, {"adaptation.method": method, "adaptation.steps": "3", "adaptation.lr": "0.01"})
    clip = _clip(config, Continuer(config, "baseline"))
    baseline, adapted = (Continuer(config, stage).run(clip).first for stage in ("baseline", "adapt"))
    assert not np.array_equal(baseline, adapted)


def test_reset_restores_base_and_adapter_exactly(prepared):
    config = load_config(prepared, {"adaptation.steps": "3", "adaptation.lr": "0.01"})
    continuer = Continuer(config, "adapt")
    transformer = continuer.backend.transformer
    snapshot = {k: v.clone() for k, v in transformer.state_dict().items()}
    clip = _clip(config, continuer, 0)
    first = continuer.run(clip).first
    changed = [k for k, v in transformer.state_dict().items() if not torch.equal(v, snapshot[k])]
    assert changed and all("lora_" in k for k in changed)  # only the adapter trained
    continuer.run(_clip(config, continuer, 1))  # adapt to another clip in between
    continuer.adapter.reset()
    assert all(torch.equal(v, snapshot[k]) for k, v in transformer.state_dict().items())
    assert np.array_equal(first, continuer.run(clip).first)  # the same clip again gives the same result


def test_oracle_mode_trains_on_the_whole_clip(prepared):
    config = load_config(prepared, {"adaptation.data": "oracle", "adaptation.steps": "2"})
    continuer = Continuer(config, "adapt")
    out = continuer.run(_clip(config, continuer))
    assert out.metrics["adapt_steps_per_second"] > 0 and out.first.shape[0] == config.data.frames


def test_nan_loss_is_reported_with_its_steps():
    param = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(NonFiniteLoss, match="loss became nan within steps 1-2"):
        train(TorchAdamW([param], lr=0.1, warmup=1), lambda step: param.sum() * float("nan"), steps=2, log_every=2)


def test_denoising_objective_runs_on_a_single_frame(prepared):
    config = load_config(prepared, {"adaptation.objective": "denoising"})
    backend = load_backend(config)
    adapter = LoraAdapter(backend, config.adaptation)
    stats = adapt_to_clip(backend, adapter, torch.rand(1, 3, 1, 16, 16), config.adaptation, seed=0)
    assert np.isfinite(stats["adapt_loss_last"])
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        adapt_to_clip(backend, adapter, torch.rand(1, 3, 1, 16, 16),
                      load_config(prepared).adaptation, seed=0)


def test_gradient_accumulation_averages_micro_batches():
    """Two micro-batches (losses a, b) per step give the gradient of one batch with loss (a + b) / 2."""
    targets = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])]

    def grad_after_one_step(accum: int) -> torch.Tensor:
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer = TorchAdamW([param], lr=0.0, warmup=0, accum=accum)  # lr 0: gradients only
        if accum == 2:
            losses = iter([((param - t) ** 2).sum() for t in targets])
            loss_fn = lambda step: next(losses)  # noqa: E731
        else:
            loss_fn = lambda step: sum(((param - t) ** 2).sum() for t in targets) / 2  # noqa: E731
        optimizer.step = lambda: None  # keep the accumulated gradient for the comparison
        train(optimizer, loss_fn, steps=1)
        return param.grad

    assert torch.allclose(grad_after_one_step(2), grad_after_one_step(1))


def test_deepspeed_trains_in_the_models_own_precision():
    """bf16 for a bf16 model only: an fp32 model's live weights must not be rounded to bf16."""
    from pipeline.adaptation.optim import deepspeed_config

    fp32, bf16 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert not deepspeed_config(fp32, 1e-4, 1, 2, False, 1)["bf16"]["enabled"]
    assert deepspeed_config(bf16, 1e-4, 1, 2, False, 1)["bf16"]["enabled"]


def test_plain_adamw_trains_bf16_weights_through_fp32_masters():
    """Full fine-tuning of a bf16 model without DeepSpeed: updates far below bf16's resolution add up
    in fp32 master weights (as DeepSpeed's bf16 mode keeps them) instead of rounding away, and the
    live bf16 weights are the masters rounded."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = TorchAdamW([weight], lr=1e-4, warmup=0)
    train(optimizer, lambda step: weight.float().sum(), steps=100)  # each step moves the weight by 1e-4
    assert weight.dtype == torch.bfloat16
    assert optimizer.masters[0].dtype == torch.float32
    assert torch.allclose(optimizer.masters[0], torch.full((4,), 0.99), atol=1e-6)
    assert torch.equal(weight, optimizer.masters[0].to(torch.bfloat16)) and (weight < 1).all()


def test_plain_adamw_skips_a_bf16_weight_without_a_gradient_this_step():
    """The bf16 gradients reach the fp32 masters in one multi-tensor copy: a weight that gets no
    gradient in a step must not be moved again by its previous step's gradient."""
    a, b = (torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)) for _ in range(2))
    optimizer = TorchAdamW([a, b], lr=1e-2, warmup=0)
    train(optimizer, lambda step: (a.float().sum() if step == 0 else 0) + b.float().sum(), steps=2)
    assert torch.allclose(optimizer.masters[0], torch.full((4,), 0.99), atol=1e-6)  # one step: Adam moves by lr
    assert torch.allclose(optimizer.masters[1], torch.full((4,), 0.98), atol=1e-6)  # two steps


def test_plain_adamw_resumes_bf16_weights_with_their_masters():
    """A checkpoint of bf16 weights keeps their fp32 masters (pretraining's resume): training resumed
    from it ends bitwise where uninterrupted training ends. Without the saved masters a resumed
    optimizer would start from masters rounded to bf16; with none at all, from its construction's."""
    def run(steps: int, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8, dtype=torch.bfloat16))
        optimizer = TorchAdamW([weight], lr=1e-4, warmup=0)
        if state is not None:
            weight.data.copy_(state["weight"])
            optimizer.load_state_dict(state)
        train(optimizer, lambda step: (weight.float() ** 2).sum(), steps=steps)
        saved = optimizer.state_dict()
        return weight.detach().clone(), {**saved, "weight": weight.detach().clone(),
                                         "masters": [m.clone() for m in saved["masters"]]}

    whole, _ = run(60)
    _, state = run(30)
    resumed, _ = run(30, state)
    assert torch.equal(resumed, whole)
    rounded, _ = run(30, {**state, "masters": None})  # masters taken from the rounded live weights
    assert not torch.equal(rounded, whole)


def test_how_closely_the_continuation_follows_its_prefix_is_measured(prepared):
    config = load_config(prepared)  # one sample: its first frame is `out.first[K]`
    continuer = Continuer(config, "baseline")
    clip = _clip(config, continuer)
    out = continuer.run(clip)
    K = config.data.context
    assert out.metrics["continuity_psnr"] == frame_metrics(out.first[K:K + 1], clip.frames[K - 1:K])["psnr"][0]
    assert out.metrics["first_frame_psnr"] == out.per_frame["psnr"][0]
    assert out.metrics["truth_continuity_psnr"] == frame_metrics(clip.frames[K:K + 1], clip.frames[K - 1:K])["psnr"][0]


# --- the noise methods: weights frozen, the sampler's starting noise chosen on the context alone ---
NOISE_METHODS = {"select": {"adaptation.candidates": "4"},
                 "noise": {"adaptation.steps": "3", "adaptation.lr": "0.1", "adaptation.proxy_steps": "2"}}


@pytest.mark.parametrize("method", sorted(NOISE_METHODS))
def test_noise_methods_lower_the_proxy_error_without_seeing_the_target_frames(prepared, method):
    config = load_config(prepared, {"adaptation.method": method, "sampling.samples": "2", **NOISE_METHODS[method]})
    continuer = Continuer(config, "adapt")
    clip = _clip(config, continuer)
    out = continuer.run(clip)
    noise = continuer.adapter.sampling_noise()
    assert out.metrics["proxy_error_last"] < out.metrics["proxy_error_first"]
    changed = continuer.run(_with_frames(clip, _noise_after(clip.frames, config.data.context)))
    assert np.array_equal(changed.first, out.first) and torch.equal(continuer.adapter.sampling_noise(), noise)
    assert not np.array_equal(out.first, Continuer(config, "baseline").run(clip).first)


def test_selecting_from_one_candidate_is_the_baseline_bitwise(prepared):
    config = load_config(prepared, {"adaptation.method": "select", "adaptation.candidates": "1", "sampling.samples": "2"})
    clip = _clip(config, Continuer(config, "baseline"))
    adapted, baseline = Continuer(config, "adapt").run(clip), Continuer(config, "baseline").run(clip)
    assert np.array_equal(adapted.first, baseline.first) and adapted.per_sample == baseline.per_sample


def test_noise_methods_name_what_they_cannot_do(prepared):
    config = load_config(prepared, {"adaptation.method": "select", "adaptation.proxy_frames": "3"})
    continuer = Continuer(config, "adapt")
    with pytest.raises(ValueError, match=r"adaptation.proxy_frames=3: .* 0 < m < 3"):
        continuer.run(_clip(config, continuer))
    with pytest.raises(ConfigError, match="adaptation.method='noise' judges noises .* the oracle's window"):
        load_config(prepared, {"adaptation.method": "noise", "adaptation.data": "oracle"})
    backend = load_backend(config)
    backend.takes_noise = False  # as every backend but LTX-Video declares
    with pytest.raises(ValueError, match="adaptation.method=select chooses the sampler's starting noise"):
        Continuer(config, "adapt", backend)


# --- adaptation.eval_at: the step curve from one adaptation ---
COSTS = {"adapt_seconds", "adapt_steps_per_second", "encode_seconds", "sample_seconds", "decode_seconds",
         "metrics_seconds", "peak_rss_mb", "peak_gpu_memory_mb", "context_cached"}


@pytest.mark.parametrize("method", ["lora", "full", "noise"])
def test_a_step_of_eval_at_is_the_arm_of_that_many_steps(prepared, method):
    """What eval_at scores after s steps of one adaptation is, bit for bit, what an arm of
    adaptation.steps=s makes on its own (same samples, scores and adaptation figures; only the costs
    differ), so each point is recorded under that arm's key."""
    settings = {"adaptation.method": method, "adaptation.lr": "0.01", "sampling.samples": "2",
                **({"adaptation.proxy_steps": "2"} if method == "noise" else {})}
    config = load_config(prepared, {**settings, "adaptation.steps": "4", "adaptation.eval_at": "0,2"})
    continuer = Continuer(config, "adapt")
    clip = _clip(config, continuer)
    points = {}
    final = continuer.run(clip, at={0, 2}, emit=lambda steps, out: points.setdefault(steps, out))
    assert sorted(points) == [0, 2]
    for steps, out in [*points.items(), (4, final)]:
        alone = Continuer(load_config(prepared, {**settings, "adaptation.steps": str(steps)}), "adapt").run(clip)
        assert np.array_equal(out.first, alone.first) and out.per_sample == alone.per_sample
        figures = {k: v for k, v in out.metrics.items() if k not in COSTS}
        assert figures.keys() == {k for k in alone.metrics if k not in COSTS}
        assert all(np.array_equal(v, alone.metrics[k], equal_nan=True) for k, v in figures.items()), steps
    assert not np.array_equal(points[0].first, final.first)  # the points differ: the check can fail


# --- sampling.clips_per_batch: several clips adapted together, each with its own adapter ---
def test_clips_adapted_together_equal_one_at_a_time(prepared):
    """Three clips in one batched LoRA (each its own adapter, optimizer state and draws) give what
    each gives alone, up to float rounding: samples, scores, losses and adapted weights. A clip whose
    loss turns NaN fails alone; the others are not touched by it."""
    settings = {"adaptation.lr": "0.01", "adaptation.steps": "4", "sampling.samples": "2",
                "adaptation.save_weights": "true"}
    alone = Continuer(load_config(prepared, settings), "adapt")
    together = Continuer(load_config(prepared, {**settings, "sampling.clips_per_batch": "3"}), "adapt")
    clips = [_clip(together.config, together, i) for i in range(3)]
    outputs = together.run_group(clips)
    for clip, out in zip(clips, outputs):
        expected = alone.run(clip)
        assert np.abs(out.first.astype(int) - expected.first).max() <= 1
        for name in ("psnr", "ssim"):
            assert out.per_sample[name] == pytest.approx(expected.per_sample[name], rel=1e-4, abs=1e-4)
        for name in ("adapt_loss_first", "adapt_loss_last"):
            assert out.metrics[name] == pytest.approx(expected.metrics[name], rel=1e-4)
        assert out.weights.keys() == expected.weights.keys()
        # with its one prompt token, the tiny model's cross-attention weighs that token 1 whatever its
        # query and key: their gradients are rounding noise, which AdamW scales up to whole steps
        assert all(torch.allclose(out.weights[k], expected.weights[k], atol=1e-5) for k in out.weights
                   if not any(f"attn2.{p}." in k for p in ("to_q", "to_k")))
    assert not np.array_equal(outputs[0].first, outputs[1].first)

    window = together.window
    together.window = lambda clip, latents: window(clip, latents) * (math.nan if clip is clips[1] else 1)
    failed = together.run_group(clips)
    assert isinstance(failed[1], NonFiniteLoss) and "loss became nan at step 1" in str(failed[1])
    for before, after in ((outputs[0], failed[0]), (outputs[2], failed[2])):
        assert np.array_equal(before.first, after.first) and before.per_sample == after.per_sample


def test_every_route_of_clips_adapted_together_writes_one_index_tensor(prepared):
    """Compiled blocks read the slot index of clips adapted together as a static input of their CUDA
    graphs: a new index tensor per route re-recorded every graph (4 clips 4x slower on an H100). So
    every route writes the same tensor, and the outer route holds again after an inner one."""
    batched = Continuer(load_config(prepared, {"sampling.clips_per_batch": "3"}), "adapt").batched
    storage = batched.routing.index.untyped_storage().data_ptr()
    with batched.route([0, 1, 2], 2):
        with batched.route([2, 0], 1):
            assert batched.routing.index.tolist() == [2, 0]
            assert batched.routing.index.untyped_storage().data_ptr() == storage
        assert batched.routing.index.tolist() == [0, 1, 2] and batched.routing.items_per_clip == 2
        assert batched.routing.index.untyped_storage().data_ptr() == storage


def test_clips_sampled_together_keep_the_baseline_and_zero_steps_bitwise(prepared):
    """The baseline of three clips in one batch equals one clip at a time up to float rounding, and 0
    adaptation steps in the same batch reproduce that batched baseline bit for bit."""
    settings = {"sampling.samples": "2", "sampling.clips_per_batch": "3", "adaptation.steps": "0"}
    together = Continuer(load_config(prepared, settings), "baseline")
    clips = [_clip(together.config, together, i) for i in range(3)]
    outputs = together.run_group(clips)
    adapted = Continuer(load_config(prepared, settings), "adapt").run_group(clips)
    alone = Continuer(load_config(prepared, {"sampling.samples": "2"}), "baseline")
    for clip, out, zero in zip(clips, outputs, adapted):
        expected = alone.run(clip)
        assert np.abs(out.first.astype(int) - expected.first).max() <= 1
        assert out.per_sample["psnr"] == pytest.approx(expected.per_sample["psnr"], rel=1e-4)
        assert out.metrics["repeat_last_psnr"] == expected.metrics["repeat_last_psnr"]  # no model: the same
        assert np.array_equal(zero.first, out.first) and zero.per_sample == out.per_sample


def test_a_step_of_eval_at_in_clips_adapted_together_is_that_arm_batched(prepared):
    """eval_at with sampling.clips_per_batch: what the group emits after s steps is, bit for bit, what
    the batched arm of adaptation.steps=s makes on its own; a clip whose loss turns NaN emits nothing
    after it and fails, the others go on."""
    settings = {"adaptation.lr": "0.01", "sampling.samples": "2", "sampling.clips_per_batch": "3"}
    continuer = Continuer(load_config(prepared, {**settings, "adaptation.steps": "4", "adaptation.eval_at": "0,2"}),
                          "adapt")
    clips = [_clip(continuer.config, continuer, i) for i in range(3)]
    points = {}
    final = continuer.run_group(clips, {0, 2}, lambda i, steps, out: points.setdefault((i, steps), out))
    assert sorted(points) == [(i, s) for i in range(3) for s in (0, 2)]
    for steps in (0, 2, 4):
        alone = Continuer(load_config(prepared, {**settings, "adaptation.steps": str(steps)}), "adapt").run_group(clips)
        for i, expected in enumerate(alone):
            out = final[i] if steps == 4 else points[i, steps]
            assert np.array_equal(out.first, expected.first) and out.per_sample == expected.per_sample, (i, steps)
            assert out.metrics["adapt_loss_last"] == expected.metrics["adapt_loss_last"] or steps == 0
    assert not np.array_equal(points[0, 2].first, final[0].first)

    window, points = continuer.window, {}
    continuer.window = lambda clip, latents: window(clip, latents) * (math.nan if clip is clips[1] else 1)
    failed = continuer.run_group(clips, {0, 2}, lambda i, steps, out: points.setdefault((i, steps), out))
    assert sorted(points) == [(0, 0), (0, 2), (1, 0), (2, 0), (2, 2)]  # 0 steps: clip 1 is the baseline yet
    assert isinstance(failed[1], NonFiniteLoss) and np.array_equal(failed[2].first, final[2].first)


def test_clips_per_batch_names_what_it_cannot_do(prepared):
    with pytest.raises(ConfigError, match="'sampling.clips_per_batch' also adapts .* takes adaptation.method=lora"):
        load_config(prepared, {"sampling.clips_per_batch": "2", "adaptation.method": "full"})
    config = load_config(prepared, {"sampling.clips_per_batch": "2"})
    backend = load_backend(config)
    backend.batches_clips = False  # as Open-Sora v1.3 declares
    with pytest.raises(ValueError, match="sampling.clips_per_batch=2: .* adapts one clip at a time"):
        Continuer(config, "adapt", backend)
