import pytest

from conftest import ROOT
from pipeline.config import ConfigError, load_config


def test_presets_load_and_flatten(tmp_path):
    config = load_config("conf/demo.yaml")
    flat = config.flat()
    assert flat["adaptation.rank"] == 16 and flat["data.frames"] == 16
    assert all("." in k for k in flat if k not in ("experiment", "seed"))


@pytest.mark.parametrize("text, message", [
    ("adaptation: {rnk: 4}", "unknown key 'adaptation.rnk'"),
    ("adaptation: {rank: four}", "'adaptation.rank' must be int"),
    ("adaptation: {data: future}", "'adaptation.data' is 'future'"),
    ("data: {frames: 8, context: 8}", "'data.context' (8)"),
    ("modle: {}", "unknown key 'modle'"),
    ("data: 3", "'data' must be a section"),
    ("adaptation: {method: full, save_weights: true}", "'adaptation.save_weights' keeps LoRA weights"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_overrides_apply_and_empty_means_unset():
    config = load_config("conf/demo.yaml", {"adaptation.rank": "32", "adaptation.lr": "", "adaptation.data": "oracle"})
    assert config.adaptation.rank == 32 and config.adaptation.lr == 1e-3 and config.adaptation.data == "oracle"
    with pytest.raises(ConfigError, match="unknown key 'adaptation.rnak'"):
        load_config("conf/demo.yaml", {"adaptation.rnak": "3"})


def test_digest_tracks_results_not_clip_selection():
    base = load_config("conf/demo.yaml")
    fewer = load_config("conf/demo.yaml", {"data.num_clips": "2"})
    other_rank = load_config("conf/demo.yaml", {"adaptation.rank": "4"})
    keeping_weights = load_config("conf/demo.yaml", {"adaptation.save_weights": "true"})
    assert base.digest("data", "adaptation") == fewer.digest("data", "adaptation")
    assert base.digest("data", "adaptation") == keeping_weights.digest("data", "adaptation")
    assert base.digest("data", "adaptation") != other_rank.digest("data", "adaptation")
    assert base.digest("data", "sampling") == other_rank.digest("data", "sampling")  # baseline unaffected


def test_committed_weights_are_up_to_date_for_the_demo():
    """`make demo` must find checkpoints/ltx-small.safetensors current, not retrain it for 25 minutes."""
    from pipeline.stages.pretrain import _digest_of, weights_digest

    config = load_config(ROOT / "conf" / "demo.yaml")
    assert _digest_of(ROOT / config.model.weights) == weights_digest(config)
