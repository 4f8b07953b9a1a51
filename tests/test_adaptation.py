"""The protocol's guarantees: 0 steps = baseline bitwise; reset restores base and adapter exactly;
both arms sample with the same seeds."""
import numpy as np
import pytest
import torch

from pipeline.adaptation.lora import LoraAdapter
from pipeline.adaptation.optim import TorchAdamW
from pipeline.adaptation.trainer import NonFiniteLoss, adapt_to_clip, train
from pipeline.config import load_config
from pipeline.data.manifest import read_manifest, select_clips
from pipeline.models import load_backend
from pipeline.stages.continuation import Continuer


def _clip(config, continuer, index=0):
    records = select_clips(read_manifest(config.data.manifest), "test", 0)
    return continuer.load_clip(config.data.manifest, records[index])


def test_zero_steps_reproduces_the_baseline_bitwise(prepared):
    config = load_config(prepared, {"adaptation.steps": "0"})
    baseline = Continuer(config, "baseline")
    adapted = Continuer(config, "adapt")  # a separate model with a LoRA adapter attached
    frames = _clip(config, baseline)
    out_b, metrics_b, _ = baseline.run("clip0", frames)
    out_a, metrics_a, _ = adapted.run("clip0", frames)
    assert np.array_equal(out_a, out_b)
    assert metrics_a["psnr"] == metrics_b["psnr"]
    assert len(adapted.adapter.parameters()) > 0


def test_adaptation_changes_the_output(prepared):
    config = load_config(prepared, {"adaptation.steps": "3", "adaptation.lr": "0.01"})
    frames = _clip(config, Continuer(config, "baseline"))
    baseline, adapted = (Continuer(config, stage).run("clip0", frames)[0] for stage in ("baseline", "adapt"))
    assert not np.array_equal(baseline, adapted)


def test_reset_restores_base_and_adapter_exactly(prepared):
    config = load_config(prepared, {"adaptation.steps": "3", "adaptation.lr": "0.01"})
    continuer = Continuer(config, "adapt")
    transformer = continuer.backend.transformer
    snapshot = {k: v.clone() for k, v in transformer.state_dict().items()}
    frames = _clip(config, continuer, 0)
    first, _, _ = continuer.run("clip0", frames)
    changed = [k for k, v in transformer.state_dict().items() if not torch.equal(v, snapshot[k])]
    assert changed and all("lora_" in k for k in changed)  # only the adapter trained
    continuer.run("clip1", _clip(config, continuer, 1))  # adapt to another clip in between
    continuer.adapter.reset()
    assert all(torch.equal(v, snapshot[k]) for k, v in transformer.state_dict().items())
    again, _, _ = continuer.run("clip0", frames)  # the same clip again gives the same result
    assert np.array_equal(first, again)


def test_both_arms_use_the_configured_sampling_seed(prepared):
    config = load_config(prepared, {"adaptation.steps": "0"})
    other = load_config(prepared, {"adaptation.steps": "0", "sampling.seed": "7"})
    frames = _clip(config, Continuer(config, "baseline"))
    baseline = Continuer(config, "baseline").run("clip0", frames)[0]
    assert not np.array_equal(baseline, Continuer(other, "adapt").run("clip0", frames)[0])


def test_oracle_mode_trains_on_the_whole_clip(prepared):
    config = load_config(prepared, {"adaptation.data": "oracle", "adaptation.steps": "2"})
    continuer = Continuer(config, "adapt")
    out, metrics, _ = continuer.run("clip0", _clip(config, continuer))
    assert metrics["adapt_steps_per_second"] > 0 and out.shape[0] == config.data.frames


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


def test_full_finetuning_changes_the_output_and_reset_restores_every_weight(prepared):
    """adaptation.method=full on the CPU (plain AdamW; DeepSpeed runs on GPUs): zero steps equal the
    baseline, training changes the continuation, the next clip starts from the base weights again."""
    config = load_config(prepared, {"adaptation.method": "full", "adaptation.steps": "2", "adaptation.lr": "0.01"})
    baseline = Continuer(config, "baseline")
    frames = _clip(config, baseline)
    out_b = baseline.run("clip0", frames)[0]
    adapted = Continuer(config, "adapt")
    base = [p.detach().clone() for p in adapted.adapter.parameters()]
    assert not np.array_equal(adapted.run("clip0", frames)[0], out_b)
    adapted.adapter.reset()
    assert all(torch.equal(p, b) for p, b in zip(adapted.adapter.parameters(), base))
    zero = Continuer(load_config(prepared, {"adaptation.method": "full", "adaptation.steps": "0"}), "adapt")
    assert np.array_equal(zero.run("clip0", frames)[0], out_b)


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
