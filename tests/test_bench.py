"""The benchmark's FLOP counting and its table, on a tiny LTX-Video transformer on the CPU."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline import bench

TINY = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
            cross_attention_dim=32, num_layers=2, caption_channels=16)


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
    model, params, (step, _, sample_step) = bench.build(TINY, case, cpu, fast=False)
    with sdpa_kernel(SDPBackend.MATH):  # the decomposed kernel that the CPU counter can see
        forward = bench.count_flops(sample_step)
        lora_step = bench.count_flops(step)
    assert forward == analytic_forward_flops(model, TINY, case.tokens, 5)
    assert 1.5 * forward < lora_step < 2.5 * forward  # input gradients, no frozen weight gradients
    _, _, (full_step, _, full_forward) = bench.build(TINY, bench.Case(17, 64, "full"), cpu, fast=False)
    with sdpa_kernel(SDPBackend.MATH):
        forward, step = bench.count_flops(full_forward), bench.count_flops(full_step)
    assert 2.5 * forward < step <= 3 * forward  # weight gradients too


def test_table_lists_every_result():
    case = bench.Case(65, 256)
    results = [bench.Result(case, p, 10.0, 2e12, 200.0, 0.25, 12.5, 4.0, 0.05) for p in ("plain", "fast")]
    table = bench.format_table(results, 790.0).splitlines()
    assert table[0] == "bf16 matmul peak measured in this run: 790 TFLOP/s"
    assert table[-1] == "| 65 | 256 | 576 | lora | 16 | no | fast | 10.0 | 2000 | 200 | 25.0% | 12.5 | 4.0 | 0.05 |"
    assert len(table) == 4 + len(results) and case.tokens == 9 * 8 * 8


def test_stage_loop_times_the_stages_own_path():
    config = {**TINY, "in_channels": 8, "out_channels": 8}
    timing = bench.stage_loop(bench.Case(17, 64, rank=4), compile=False, device=torch.device("cpu"), steps=2,
                              config=config)
    assert timing["tta_step_ms"] > 0 and timing["sample_seconds"] > 0


def test_evaluation_timing_runs_batched_metrics():
    timing = bench.evaluation_seconds(clips=2, frames=3, size=64, device=torch.device("cpu"), chunk=4)
    assert timing["seconds"] > 0 and (timing["clips"], timing["frames"], timing["size"]) == (2, 3, 64)
