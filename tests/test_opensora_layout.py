"""Open-Sora frame/latent arithmetic, condition masks and presets: plain CPU tests, no upstream package."""
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import opensora_v13 as v13
from pipeline.models import opensora_v20 as v20
from pipeline.models.upstream import OpenSoraMissing, require_opensora
from pipeline.stages.continuation import arm_label


@pytest.mark.parametrize("frames, latents, covered", [
    (1, 1, 1), (5, 2, 5), (8, 2, 5), (9, 3, 9), (17, 5, 17), (33, 10, 33), (34, 11, 33), (45, 14, 45), (49, 15, 49),
])
def test_v13_latent_frames_follow_the_overlapping_17_frame_chunks(frames, latents, covered):
    assert v13.latent_frames_of(frames) == (latents, covered)


def test_v13_whole_chunks_agree_with_upstream_get_latent_size():
    # OpenSoraVAE_V1_3_Pipline.get_latent_size with temporal_overlap: (T - 1) // 16 * 5
    for n in range(1, 6):
        frames = 16 * n + 1
        assert v13.latent_frames_of(frames)[0] == (frames - 1) // 16 * 5 == v13.generated_latent_frames(frames)
        assert v13.decoded_frames(v13.generated_latent_frames(frames)) == frames


def test_v13_seed_shape_layout():
    layout = v13.frame_layout(45, 8, 240, 320)
    # 45 frames are generated as 3 whole chunks (49 frames) and cut; K=8 reaches the model as 2
    # latent frames covering pixel frames [0, 5)
    assert (layout.latent_frames, layout.latent_context, layout.conditioned_pixel_frames) == (15, 2, 5)
    assert v13.decoded_frames(layout.latent_frames) == 49
    with pytest.raises(ValueError, match="divisible by 16"):
        v13.frame_layout(45, 8, 240, 330)


def test_v20_seed_shape_layout():
    layout = v20.frame_layout(65, 33, 256, 256)
    # upstream v2v_head conditions on 8 + 1 latent frames: exactly pixel frames [0, 33)
    assert (layout.latent_frames, layout.latent_context, layout.conditioned_pixel_frames) == (17, 9, 33)
    assert v20.frame_layout(65, 30, 256, 256).conditioned_pixel_frames == 29  # never a partial latent frame
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        v20.frame_layout(64, 33, 256, 256)
    with pytest.raises(ValueError, match="divisible by 16"):
        v20.frame_layout(65, 33, 256, 200)


def test_v13_frame_mask_marks_only_the_prefix_clean():
    mask = v13._frame_mask(2, 5, 2, torch.device("cpu"))
    assert mask.tolist() == [[False, False, True, True, True]] * 2


def test_v20_condition_is_mask_channel_plus_masked_latents_packed():
    context = torch.randn(1, 16, 3, 4, 4)
    cond = v20.condition(context, frames=5)
    assert cond.shape == (1, 5 * 2 * 2, (16 + 1) * 4)  # 68 channels per token, as MMDiT's cond_in expects
    full = v20.unpack(cond, 5, 4, 4)
    assert torch.all(full[:, 0, :3] == 1) and torch.all(full[:, 0, 3:] == 0)
    assert torch.equal(full[:, 1:, :3], context) and torch.all(full[:, 1:, 3:] == 0)


def test_v20_pack_round_trip_and_ids():
    x = torch.randn(2, 16, 3, 4, 6)
    assert torch.equal(v20.unpack(v20.pack(x), 3, 4, 6), x)
    ids = v20.image_ids(2, 3, 4, 6, torch.device("cpu"))
    assert ids.shape == (2, 3 * 2 * 3, 3) and ids[0, -1].tolist() == [2, 1, 2]


def test_block_diagonal_attention_equals_masked_attention():
    """The portable stand-in for xformers' call in STDiT3's cross-attention, against a dense mask."""
    from types import SimpleNamespace

    from pipeline.models.upstream import block_diagonal_attention

    q, k, v = torch.randn(1, 12, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    bias = SimpleNamespace(q_seqinfo=SimpleNamespace(seqstart_py=[0, 6, 12]),
                           k_seqinfo=SimpleNamespace(seqstart_py=[0, 3, 8]))
    mask = torch.full((12, 8), float("-inf"))
    mask[:6, :3] = 0
    mask[6:, 3:] = 0
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    assert torch.allclose(block_diagonal_attention(q, k, v, attn_bias=bias), dense, atol=1e-6)


def test_presets_load_with_the_seed_settings():
    naive = load_config("conf/opensora13-naive.yaml")
    assert (naive.data.frames, naive.data.context, naive.model.backend) == (45, 8, "opensora-v1.3")
    a = naive.adaptation
    settings = (a.method, a.data, a.objective, a.lr, a.batch_size, a.zero_stage)
    assert settings == ("full", "oracle", "v2v_head", 1e-5, 1, 2)
    assert "ORACLE" in arm_label(naive, "adapt") and "full fine-tuning" in arm_label(naive, "adapt")
    lora = load_config("conf/opensora20-lora.yaml")
    assert (lora.data.frames, lora.data.context, lora.data.height) == (65, 33, 256)
    a = lora.adaptation
    assert (a.method, a.rank, a.alpha, a.lr, a.steps, a.warmup) == ("lora", 16, 32, 2e-4, 100, 5)
    assert (lora.sampling.steps, lora.sampling.guidance, lora.sampling.image_guidance) == (25, 7.5, 3.0)


def test_missing_upstream_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opensora", None)  # as if not installed
    with pytest.raises(OpenSoraMissing, match="git clone -b opensora/v1.3"):
        require_opensora("v1.3")


def test_v13_image_weights_are_made_on_the_samplers_device():
    """The guided v1.3 sampler multiplies its GPU velocities by these weights: made on the CPU they
    stopped every guided sample on a GPU ("Expected all tensors to be on the same device")."""
    weights = v13.image_weight(5.0, 3, 30, 15, device="meta")
    assert weights.device.type == "meta" and weights.shape == (1, 1, 15, 1, 1)
    assert v13.image_weight(5.0, 3, 30, 15)[0, 0, 0, 0, 0] == 1.0 and v13.image_weight(1.0, 3, 30, 15) == 1.0
