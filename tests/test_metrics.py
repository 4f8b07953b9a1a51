"""The metric registry, FVD and FloLPIPS: their math against closed forms and hand computations, their
plumbing with explicitly random networks (values never asserted), and unavailable without weights."""
import math
from pathlib import Path

import lpips
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torchvision.models.optical_flow import raft_small

from conftest import ROOT
from pipeline.config import load_config
from pipeline.evaluation import metrics, registry
from pipeline.evaluation.flolpips import flolpips, flow_weighted_sum, lpips_layer_maps
from pipeline.evaluation.fvd import frechet_distance, fvd, gaussian, i3d_features, load_i3d
from pipeline.evaluation.weights import FETCH_COMMAND, WEIGHTS, WeightsUnavailable, sha256
from pipeline.stages.continuation import run_stage
from pipeline.stages.evaluate import evaluate, format_table


class RandomI3dStandIn(torch.nn.Module):
    """StyleGAN-V's I3D call signature with random weights, for plumbing only: never a reported value."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.dim() == 5 and x.shape[1] == 3, "uint8 (B, 3, T, H, W) expected"
        assert rescale and resize and return_features
        return self.proj(x.float().mean(dim=(2, 3, 4)) / 255)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def install_stand_in_i3d() -> Path:
    """The random stand-in where fetch-weights puts I3D, with the checksum record fetch-weights writes."""
    path = WEIGHTS["i3d"].path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(RandomI3dStandIn()).save(str(path))
    WEIGHTS["i3d"].record.write_text(sha256(path) + "\n")
    return path


def test_frechet_distance_matches_the_closed_form_of_gaussians():
    # 1-d: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2), with variances s
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == \
        pytest.approx((1 - 3) ** 2 + 4 + 9 - 2 * 6)
    # diagonal: per dimension (m1 - m2)^2 + (sd1 - sd2)^2
    m1, m2, v1, v2 = np.array([0.0, 1, 2]), np.array([1.0, 1, -1]), np.array([1.0, 2, 3]), np.array([4.0, 0.5, 3])
    expected = np.sum((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected)
    # the same full covariance on both sides: only the means count
    a = np.random.default_rng(0).normal(size=(4, 4))
    cov = a @ a.T + np.eye(4)
    assert frechet_distance(m1[:1].repeat(4), cov, np.zeros(4), cov) == pytest.approx(4 * m1[0] ** 2, abs=1e-8)


def test_a_feature_set_is_summarised_by_its_mean_and_population_covariance():
    features = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mean, cov = gaussian(features)
    assert mean.tolist() == [2.0, 4.0]
    assert cov == pytest.approx(np.cov(features, rowvar=False, bias=True))
    assert fvd(features, features) == pytest.approx(0.0, abs=1e-6)
    assert fvd(features + 1, features) == pytest.approx(2.0, abs=1e-6)  # a shift of 1 in 2 dimensions


def test_flow_weighting_by_hand():
    layer0 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    layer1 = torch.tensor([[[[5.0]]]])  # (1, 1, 1, 1)
    flow = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 2.0]]]])  # magnitudes [[0, 1], [1, 2]]
    # layer 0: weights [0, 1, 1, 2] / 4; layer 1: the flow resized to one pixel is nonzero, weight 1
    assert flow_weighted_sum([layer0, layer1], flow).item() == pytest.approx((0 + 2 + 3 + 8) / 4 + 5)
    # flows that agree everywhere: uniform weights, the plain spatial mean
    assert flow_weighted_sum([layer0, layer1], torch.zeros_like(flow)).item() == pytest.approx(2.5 + 5)


def test_flolpips_with_a_uniform_motion_error_is_lpips():
    """LPIPS's per-layer maps, read from the lpips package's own (randomly initialised) network,
    weighted uniformly, give exactly the package's value."""
    model = lpips.LPIPS(pretrained=False, pnet_rand=True, verbose=False).eval()
    generator = torch.Generator().manual_seed(0)
    p, t = (torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        maps = lpips_layer_maps(model, p, t)
        uniform = torch.ones(2, 2, 64, 64)
        assert flow_weighted_sum(maps, uniform) == pytest.approx(model(p, t).flatten(), rel=1e-5)


def test_flolpips_plumbing_with_random_networks():
    model = lpips.LPIPS(pretrained=False, pnet_rand=True, verbose=False).eval()
    torch.manual_seed(0)
    flow = raft_small().eval()
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # under RAFT's 128 px: upsampled for the flow
    prediction = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    values = flolpips(prediction, truth, model, flow)
    assert len(values) == 2 and all(math.isfinite(v) and v != 0 for v in values)  # every frame with a successor
    assert flolpips(truth, truth, model, flow) == [0.0, 0.0]


def test_optical_flow_in_chunks_equals_one_call(monkeypatch):
    """RAFT runs on FLOW_BATCH frame pairs at a time: the chunks put together are the flow of one call."""
    from pipeline.evaluation import flolpips as module

    torch.manual_seed(0)
    flow = raft_small().eval()
    first, second = (torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in (1, 2))
    whole = module.optical_flow(flow, first, second)
    monkeypatch.setattr(module, "FLOW_BATCH", 2)
    assert torch.allclose(module.optical_flow(flow, first, second), whole, atol=1e-4)  # float order only (flows ~20 px)


def test_i3d_features_reach_the_network_as_stylegan_v_feeds_it(torch_home):
    detector = load_i3d(install_stand_in_i3d())
    videos = np.random.default_rng(0).integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    features = i3d_features(detector, videos, "cpu")
    assert features.shape == (2, 6) and features.dtype == np.float64


def test_without_weights_each_metric_is_unavailable_with_the_fetch_command(torch_home):
    scorer = metrics.Scorer(lpips=True, lpips_net="alex", device="cpu")
    assert set(scorer.unavailable) == {"lpips", "flolpips", "fvd"} and scorer.networks == {}
    for name, note in scorer.unavailable.items():
        assert note.startswith(f"{name} unavailable: ") and FETCH_COMMAND in note and "\n" not in note
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    assert set(scorer.frames(frames, frames, frames[0])) == {"psnr", "ssim", "warp_error", "flicker"}
    assert scorer.features(frames[None]) is None


def test_weights_are_refused_unless_their_checksum_matches(torch_home):
    path = install_stand_in_i3d()
    assert metrics.Scorer(lpips=False, lpips_net="alex", device="cpu").networks == {"fvd": WEIGHTS["i3d"].network}
    with open(path, "ab") as f:
        f.write(b"changed")
    with pytest.raises(WeightsUnavailable, match="does not match its checksum"):
        WEIGHTS["i3d"].verified("fvd")
    WEIGHTS["i3d"].record.unlink()
    with pytest.raises(WeightsUnavailable, match="no checksum record"):
        WEIGHTS["i3d"].verified("fvd")
    WEIGHTS["alexnet"].path.write_bytes(b"not alexnet")
    with pytest.raises(WeightsUnavailable, match="does not match its checksum"):
        WEIGHTS["alexnet"].verified("lpips")


def test_fvd_over_an_arms_clips_through_the_stages(prepared, store, torch_home):
    """The stages with a random stand-in I3D: features per sample and of the truth on each clip run,
    FVD per arm over the same clips in evaluate's summary, table and MLflow metrics."""
    install_stand_in_i3d()
    config = load_config(prepared, {"sampling.samples": "2", "experiment": "fvd"})
    run_stage(config, "baseline")
    run_stage(config, "adapt")
    summary = evaluate(config)
    result = summary["sets"]["fvd"]
    assert (result["clips"], result["frames"]) == (3, config.data.frames - config.data.context)
    assert set(result["arms"]) == {"baseline", "adapted"} and all(a["videos"] == 6 for a in result["arms"].values())
    assert "noisy below a few hundred clips" in format_table(summary) and "fvd unavailable" not in format_table(summary)
    logged = mlflow.get_run(summary["run_id"]).data.metrics
    assert logged["fvd.clips"] == 3 and logged["adapted.fvd"] == pytest.approx(result["arms"]["adapted"]["value"])
    experiment = mlflow.get_experiment_by_name("fvd").experiment_id
    stage = MlflowClient().search_runs([experiment], "tags.`tta.stage` = 'baseline' and tags.`tta.kind` = 'stage'")[0]
    assert stage.data.tags["tta.network.fvd"] == WEIGHTS["i3d"].network


def test_the_registry_is_the_one_list_of_metrics():
    assert registry.COMPARED[:4] == ("psnr", "ssim", "lpips", "warp_error")  # the demo table's columns, in order
    assert metrics.LOWER_IS_BETTER is registry.LOWER_IS_BETTER and "flicker" not in registry.COMPARED
    assert registry.improved("lpips", -0.1) and registry.improved("psnr", 0.1) and not registry.improved("fvd", 1)
    assert all(w in WEIGHTS for m in registry.REGISTRY for w in m.weights)
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    assert all(f"| `{m.name}` |" in protocol for m in registry.REGISTRY)  # each defined in the docs


class ShortVideoRefusingI3dStandIn(RandomI3dStandIn):
    """The random stand-in, refusing videos shorter than I3D's temporal pooling can take."""

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        if x.shape[2] < 16:
            raise RuntimeError("input image (T: 1 H: 7 W: 7) smaller than kernel size (kT: 2 kH: 7 kW: 7)")
        return self.proj(x.float().mean(dim=(2, 3, 4)) / 255)


def test_continuations_too_short_for_i3d_leave_fvd_unavailable_and_the_clips_scored(prepared, store, torch_home):
    path = install_stand_in_i3d()
    torch.jit.script(ShortVideoRefusingI3dStandIn()).save(str(path))
    WEIGHTS["i3d"].record.write_text(sha256(path) + "\n")
    config = load_config(prepared, {"experiment": "short-fvd"})
    run_stage(config, "baseline")
    experiment = mlflow.get_experiment_by_name("short-fvd").experiment_id
    runs = MlflowClient().search_runs([experiment], "tags.`tta.stage` = 'baseline'")
    stage = next(r for r in runs if r.data.tags["tta.kind"] == "stage")
    clips = [r for r in runs if r.data.tags["tta.kind"] == "clip"]
    assert clips and all(r.info.status == "FINISHED" and "psnr" in r.data.metrics for r in clips)
    frames = config.data.frames - config.data.context
    note = stage.data.tags["tta.fvd"]
    assert note.startswith(f"fvd unavailable: I3D cannot take {frames}-frame continuations of 16x16 (")
    assert "smaller than kernel size (kT: 2 kH: 7 kW: 7))" in note and "\n" not in note
    assert "tta.network.fvd" not in stage.data.tags
