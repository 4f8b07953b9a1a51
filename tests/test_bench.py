"""The benchmark's FLOP counting and its table, on a tiny LTX-Video transformer on the CPU."""
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import NARROW_VAE, TINY
from pipeline.benchmarks import ltx_video as bench


def analytic_forward_flops(model, config: dict, tokens: int, text: int) -> int:
    """Linear layers, LoRA's included (2 * in * out per row), plus attention (QK^T and AV:
    4 * Sq * Skv * width); text rows for the caption projection and cross-attention keys/values."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    flops = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            rows = text if name.startswith("caption_projection") or ".attn2.to_k" in name or ".attn2.to_v" in name \
                else tokens
            flops += 2 * rows * module.in_features * module.out_features
    return flops + config["num_layers"] * 4 * width * (tokens * tokens + tokens * text)


def test_flop_counter_matches_the_formula_and_backward_costs_more(monkeypatch):
    monkeypatch.setattr(bench, "TEXT_TOKENS", 5)
    case = bench.Case(frames=17, size=64)  # 3 x 2 x 2 latent tokens
    cpu = torch.device("cpu")
    model, params, step, sample_step = bench.build(TINY, case, cpu, fast=False)
    with sdpa_kernel(SDPBackend.MATH):  # the decomposed kernel that the CPU counter can see
        forward = bench.count_flops(sample_step)
        lora_step = bench.count_flops(step)
    assert forward == analytic_forward_flops(model, TINY, case.tokens, 5)
    assert 1.5 * forward < lora_step < 2.5 * forward  # input gradients, no frozen weight gradients
    _, _, full_step, full_forward = bench.build(TINY, bench.Case(17, 64, "full"), cpu, fast=False)
    with sdpa_kernel(SDPBackend.MATH):
        forward, step = bench.count_flops(full_forward), bench.count_flops(full_step)
    assert 2.5 * forward < step <= 3 * forward  # weight gradients too


def test_table_lists_every_result():
    case = bench.Case(65, 256)
    results = [bench.Result(case, p, 10.0, 2e12, 200.0, 0.25, 12.5, 4.0, 0.05, 61.2) for p in ("plain", "fast")]
    table = bench.format_table(results, 790.0).splitlines()
    assert table[0] == "bf16 matmul peak measured in this run: 790 TFLOP/s"
    assert table[-1] == ("| 65 | 256 | 576 | lora | 16 | no | fast | 10.0 | 2000 | 200 | 25.0% | 12.5 | 4.0 | 0.05 "
                         "| 61.2 |")
    assert len(table) == 4 + len(results) and case.tokens == 9 * 8 * 8


def test_evaluation_timing_runs_batched_metrics():
    timing = bench.evaluation_seconds(clips=2, frames=3, size=64, device=torch.device("cpu"), chunk=4)
    assert timing["seconds"] > 0 and (timing["clips"], timing["frames"], timing["size"]) == (2, 3, 64)


@pytest.mark.parametrize("clips_per_batch", [1, 2])
def test_stage_clips_times_both_stages_with_tracking_and_video(tmp_path, clips_per_batch):
    """The real stages (MLflow store, mp4 writing, scoring) with the LTX-Video VAE's architecture on
    the CPU: every part of a clip's wall time is accounted for; clips per hour after the first group."""
    transformer = {**TINY, "in_channels": 128, "out_channels": 128}
    clips = clips_per_batch + 1
    arms = bench.stage_clips(tmp_path, clips=clips, frames=17, size=64, steps=2, sampling_steps=2,
                             transformer_config=transformer, vae_config=NARROW_VAE, clips_per_batch=clips_per_batch)
    for split in (arms["baseline"], arms["adapt"]):
        assert split["clips"] == 1 and split["clips_per_hour"] > 0  # the first group is left out
        model = sum(split[k] for k in ("encode_seconds", "adapt_seconds", "sample_seconds", "decode_seconds")
                    if k in split)
        rest = split["load_seconds"] + split["metrics_seconds"] + split["record_seconds"]
        assert split["non_model_share"] == pytest.approx(rest / split["clip_seconds"], rel=1e-6)
        assert model + rest + split.get("reference_seconds", 0) <= split["clip_seconds"] * 1.01
        assert split["bytes_per_clip"] > 0 and split["weight_bytes_per_clip"] == 0  # videos, no weights
    assert "adapt_seconds" in arms["adapt"] and "adapt_seconds" not in arms["baseline"]
    assert (arms["baseline"]["context_cached"], arms["adapt"]["context_cached"]) == (0, 1)  # encoded once
    assert len(list((tmp_path / "clips").rglob("*.mkv"))) == clips
    assert_whole_clip(arms, tmp_path, clips_per_batch)


def assert_whole_clip(arms: dict, workdir: Path, group: int) -> None:
    """The whole clip of --stage-clips: both arms' seconds, and FLOPs counted on one more group of
    clips through both stages under its own experiment, the timed experiment left as it was."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import TAG_KIND

    clip = arms["clip"]
    # a group's time shared among its clips: each arm's clips per hour, not its clips' clip_seconds
    assert clip["seconds"] == pytest.approx(3600 / arms["baseline"]["clips_per_hour"] + 3600 / arms["adapt"]["clips_per_hour"])
    assert clip["clips_per_gpu_hour"] == pytest.approx(3600 / clip["seconds"])
    assert clip["tflop"] > 0 and math.isnan(clip["mfu"])  # no matrix-product rate on a CPU
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for experiment, clips in (("stage-clips-flops", 2 * group), ("stage-clips", 2 * (arms["adapt"]["clips"] + group))):
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], f"tags.`{TAG_KIND}` = 'clip'")
        assert len(runs) == clips


def test_grid_lists_every_configuration_once():
    cases = bench.grid([65, 97, 121], [256, 512], [16, 64], ["lora", "full"], [False, True])
    keys = [(c.frames, c.size, c.method, c.rank, c.checkpointing) for c in cases]
    assert len(keys) == len(set(keys)) == 6 * (2 * 2 + 2)
    assert {k[2:] for k in keys} == {("lora", 16, False), ("lora", 64, False), ("lora", 16, True), ("lora", 64, True),
                                     ("full", 0, False), ("full", 0, True)}



def test_vae_timing_encodes_the_context_and_decodes_the_clip():
    timing = bench.vae_seconds(17, 64, torch.device("cpu"), config=NARROW_VAE)
    assert timing["context"] == 9 and timing["encode_context_s"] > 0 and timing["decode_clip_s"] > 0


@pytest.mark.parametrize("guidance, passes", [(1.0, 1), (3.0, 2)])
def test_sampling_timing_samples_the_baseline_continuation(guidance, passes):
    timing = bench.sampling_seconds(17, 64, torch.device("cpu"), guidance, steps=2,
                                    transformer_config={**TINY, "in_channels": 128, "out_channels": 128},
                                    vae_config=NARROW_VAE, batch=2)
    assert (timing["tokens"], timing["passes"], timing["batch"]) == (3 * 2 * 2, passes, 2)
    assert timing["sample_s_per_clip"] == timing["sample_s"] / 2 > 0


def test_adaptation_timing_counts_the_work_of_every_clip_adapted_together(tmp_path):
    """Clips adapted together run one step of all their draws: twice the clips, twice the FLOPs of a step.
    The profile names the operators of the path timed: the batched LoRA's einsum only for clips together."""
    tiny = dict(transformer_config={**TINY, "in_channels": 128, "out_channels": 128}, vae_config=NARROW_VAE)
    one, two = (bench.adaptation_seconds(17, 64, torch.device("cpu"), clips, steps=2, profile_dir=tmp_path, **tiny)
                for clips in (1, 2))
    assert (one["tokens"], two["clips"]) == (2 * 2 * 2, 2)  # the 2 latent context frames of 2x2
    assert two["flops_per_step"] == 2 * one["flops_per_step"] > 0
    assert two["adapt_s_per_clip"] == two["adapt_s"] / 2 > 0
    tables = [Path(timing["profile"]).read_text() for timing in (one, two)]
    assert Path(two["profile"]).name == "adaptation_17x64_clips2.txt"
    assert "aten::einsum" not in tables[0] and "aten::einsum" in tables[1]


def test_a_clip_of_a_released_size_preset_adds_its_steps_and_both_arms():
    """bench-backend's clip figures from its measured pieces (the seed-000 preset's own figures on an
    H100): both arms sampled, so a clip costs more than its steps and one sample, and its MFU lies
    between the step's and the sample's."""
    from pipeline.benchmarks.released_size import clip_figures

    measured = {"encode_context_s": 0.577, "optimizer_setup_s": 0.037, "step_s": 0.219, "reset_s": 0.005,
                "sample_s": 3.748, "decode_s": 0.563, "step_tflop": 31.7, "sample_tflop": 1004.7,
                "step_mfu": 0.188, "sample_mfu": 0.348, "matmul_peak_tflops": 771}
    clip = clip_figures(measured, steps=30)
    assert clip["clip_s"] > 30 * 0.219 + 2 * 3.748
    assert clip["clips_per_gpu_hour"] == pytest.approx(3600 / clip["clip_s"])
    assert measured["step_mfu"] < clip["clip_mfu"] < measured["sample_mfu"]
    # two clips adapted and sampled together (the step and sample timed for both): each clip encodes
    # and decodes its own, and shares the rest
    own = measured["encode_context_s"] + 2 * measured["decode_s"]
    together = clip_figures(measured, steps=30, clips=2)
    assert together["clip_s"] == pytest.approx(own + (clip["clip_s"] - own) / 2)
    assert together["clip_mfu"] < clip["clip_mfu"]  # the same FLOPs per group, now shared by two clips


# the SkyReels-V2 preset's clip and steps cut down for its tiny model on the CPU
TINY_SKYREELS_CLIP = {"data.frames": "9", "data.context": "5", "data.height": "32", "data.width": "32",
                      "model.dtype": "float32", "sampling.steps": "2", "adaptation.steps": "2"}


def test_backend_bench_times_clips_adapted_together_through_their_own_adapters(tmp_path):
    """bench-backend's measurement at the tiny size on the CPU: with sampling.clips_per_batch=2 the
    step and the sample timed are those of both clips through the batched LoRA (its einsum in both
    operator tables, absent for one clip), and the clip figures share them between the two."""
    from pipeline.benchmarks.released_size import clip_figures, measure

    one, two = (measure("conf/skyreels-v2.yaml", {**TINY_SKYREELS_CLIP, "sampling.clips_per_batch": str(clips)},
                        steps=3, profile_dir=tmp_path / str(clips), size="tiny") for clips in (1, 2))
    assert (one["clips_per_batch"], two["clips_per_batch"]) == (1, 2)
    for result in (one, two):  # the first two steps compile and record, and are left out of the step time
        assert len(result["step_seconds"]) == 3 and result["step_s"] == result["step_seconds"][2]
    for result, batched in ((one, False), (two, True)):
        for table in ("profile", "sample_profile"):
            assert ("aten::einsum" in Path(result[table]).read_text()) == batched
    shared = {k: two[k] for k in ("encode_context_s", "optimizer_setup_s", "step_s", "reset_s", "sample_s",
                                  "decode_s", "step_tflop", "sample_tflop", "matmul_peak_tflops")}
    # the pieces are rounded to the millisecond, the clip figure made from them before
    assert two["clip_s"] == pytest.approx(clip_figures(shared, steps=2, clips=2)["clip_s"], abs=5e-3)
    assert two["clip_s"] < clip_figures(shared, steps=2, clips=1)["clip_s"]


def test_backend_bench_refuses_fewer_steps_than_it_leaves_out():
    from pipeline.benchmarks.released_size import measure

    with pytest.raises(ValueError, match="--steps 2: at least 3"):
        measure("conf/skyreels-v2.yaml", TINY_SKYREELS_CLIP, steps=2, size="tiny")


def test_backend_stage_clips_run_a_presets_stages_on_synthetic_clips(tmp_path):
    """bench-backend --stage-clips: the preset's own stages (MLflow store, videos, scoring) on
    synthetic clips of its shape, its model random and tiny here; the first clip (compilation) is
    left out of each arm's split."""
    from pipeline.benchmarks.released_size import stage_clips

    arms = stage_clips("conf/skyreels-v2.yaml", {**TINY_SKYREELS_CLIP, "evaluation.lpips": "false"}, tmp_path,
                       clips=2, size="tiny")
    for split in (arms["baseline"], arms["adapt"]):
        assert split["clips"] == 1 and split["clips_per_hour"] > 0 and split["bytes_per_clip"] > 0
        assert split["sample_seconds"] > 0 and split["clip_seconds"] > split["sample_seconds"]
    assert "adapt_seconds" in arms["adapt"] and "adapt_seconds" not in arms["baseline"]
    assert len(list((tmp_path / "clips").rglob("*.mkv"))) == 2  # the synthetic clips at the preset's shape
    # the latents cached while counting FLOPs are gone: the timed baseline encodes, the adapted arm reads
    assert (arms["baseline"]["context_cached"], arms["adapt"]["context_cached"]) == (0, 1)
    assert_whole_clip(arms, tmp_path, group=1)
