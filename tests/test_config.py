import subprocess
import sys

import pytest

from conftest import ROOT
from pipeline.config import ConfigError, load_config


def test_presets_load_and_flatten(tmp_path):
    config = load_config("conf/demo.yaml")
    flat = config.flat()
    assert flat["adaptation.rank"] == 16 and flat["data.frames"] == 16
    assert all("." in k for k in flat if k != "experiment")


@pytest.mark.parametrize("text, message", [
    ("adaptation: {rnk: 4}", "unknown key 'adaptation.rnk'"),
    ("adaptation: {rank: four}", "'adaptation.rank' must be int"),
    ("adaptation: {data: future}", "'adaptation.data' is 'future'"),
    ("data: {frames: 8, context: 8}", "'data.context' (8)"),
    ("modle: {}", "unknown key 'modle'"),
    ("data: 3", "'data' must be a section"),
    ("adaptation: {method: full, save_weights: true}", "'adaptation.save_weights' keeps LoRA weights"),
    ("adaptation: {rank: 0}", "'adaptation.rank' is 0; LoRA needs a rank of at least 1"),
    ("model: {backend: skyreels-v2, compile: true}", "model.backend=skyreels-v2 runs uncompiled"),
    ("model: {backend: opensora-v2.0, compile: true, gradient_checkpointing: true}",
     "set one of model.compile and model.gradient_checkpointing to false"),
    ("model: {compile: true}\nadaptation: {grad_accum: 2}", "with adaptation.grad_accum > 1 set model.compile=false"),
    ("adaptation: {method: full, deepspeed: false, offload: true}", "it needs adaptation.deepspeed=true"),
    ("adaptation: {steps: 20, eval_at: '5,20'}", "each step must lie in [0, adaptation.steps) = [0, 20)"),
    ("adaptation: {eval_at: '5,ten'}", "'adaptation.eval_at' is '5,ten'; expected steps separated by commas"),
    ("adaptation: {method: select, eval_at: 2}", "adaptation.method='select' takes no steps"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_bad_override_is_named_in_one_line_before_any_heavy_import():
    """`adapt --rank 0` answers with one line naming the override, without importing torch or mlflow
    (a config error costs a fraction of a second, not the 15 s of loading the stages)."""
    code = ("import sys; from click.testing import CliRunner; from pipeline.cli import main; "
            "result = CliRunner().invoke(main, ['adapt', '--rank', '0']); print(result.exit_code, result.output); "
            "print(sorted(m for m in ('torch', 'mlflow', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    assert out[0].startswith("2 ") and any("Error: override adaptation.rank=0: 'adaptation.rank' is 0" in line
                                           for line in out)
    assert out[-1] == "[]"


def test_overrides_apply_and_empty_means_unset():
    config = load_config("conf/demo.yaml", {"adaptation.rank": "32", "adaptation.lr": "", "adaptation.data": "oracle"})
    assert config.adaptation.rank == 32 and config.adaptation.lr == 1e-3 and config.adaptation.data == "oracle"
    with pytest.raises(ConfigError, match="unknown key 'adaptation.rnak'"):
        load_config("conf/demo.yaml", {"adaptation.rnak": "3"})


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return str(value) + "x"


def test_every_setting_is_in_the_result_key_or_listed_as_unable_to_change_results():
    """Each config field, changed alone, changes the adapt stage's key, unless it is one of the
    commented NOT_RESULT_SETTINGS; adaptation settings never change the baseline's key."""
    from pipeline.config import NOT_RESULT_SETTINGS
    from pipeline.stages.continuation import stage_digest

    base = load_config("conf/demo.yaml")
    flat = base.flat()
    assert NOT_RESULT_SETTINGS <= set(flat), "a listed setting no longer exists"
    missing = []
    for key, value in flat.items():
        other = base.with_setting(key, _changed(value))
        in_key = stage_digest(other, "adapt") != stage_digest(base, "adapt")
        if in_key == (key in NOT_RESULT_SETTINGS):
            missing.append(key)
        if key.startswith("adaptation."):
            assert stage_digest(other, "baseline") == stage_digest(base, "baseline"), key
    assert not missing, f"neither in the key nor listed (or listed but in the key): {missing}"
    assert {"sampling.seed", "sampling.samples", "adaptation.noise_seed", "adaptation.init_seed"} <= set(flat)


def test_committed_weights_are_up_to_date_for_the_demo():
    """`make demo` must find checkpoints/ltx-small.safetensors current, not retrain it (more than a week
    on 2 CPU cores), and run the protocol the README reports: at least 64x64, 2 samples per clip, an
    honest context-only arm (`experiment` adds the sham beside it)."""
    from pipeline.stages.pretrain import _digest_of, weights_digest

    config = load_config(ROOT / "conf" / "demo.yaml")
    assert _digest_of(ROOT / config.model.ltx_video.weights) == weights_digest(config)
    assert min(config.data.height, config.data.width) >= 64 and config.sampling.samples >= 2
    assert config.adaptation.data == "context" and config.data.split == "test"


def test_the_choices_of_backend_and_method_are_the_registries_keys():
    from pipeline.adaptation import METHODS
    from pipeline.config import CHOICES
    from pipeline.models import BACKENDS

    assert CHOICES["model.backend"] == set(BACKENDS)
    assert CHOICES["adaptation.method"] == set(METHODS)


def test_config_imports_no_model_code():
    code = "import sys, pipeline.config; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pipeline')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pipeline', 'pipeline.config']"


def test_a_backends_options_are_keys_of_the_model_section():
    """model.vae_posterior is read by the ltx-video backend from its own options, set like any key,
    and the section lists it among its keys in flat() (and so in the result digests)."""
    config = load_config("conf/demo.yaml", {"model.vae_posterior": "mode", "model.conditioning": "clean_prefix"})
    assert config.model.ltx_video.vae_posterior == "mode" and config.model.opensora.conditioning == "clean_prefix"
    assert config.flat()["model.vae_posterior"] == "mode" and "model.ltx_video.vae_posterior" not in config.flat()
    assert config.with_setting("model.vae_posterior", "sample").model.ltx_video.vae_posterior == "sample"
    with pytest.raises(ConfigError, match="unknown key 'model.ltx_video'"):
        load_config("conf/demo.yaml", {"model.ltx_video": "{}"})


def test_a_config_written_by_section_loads_back_equal(tmp_path):
    """What preprocess writes as the data folder's config.yaml: every key where a preset puts it."""
    import yaml

    config = load_config("conf/demo.yaml", {"model.vae_posterior": "mode", "model.size": "tiny"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.sections()))
    assert load_config(path) == config


def test_a_sweep_grid_outside_the_adaptation_settings_is_refused():
    """Every arm of a sweep pairs with one baseline: a swept sampling (or data, model) setting would
    pair arms with a baseline made otherwise."""
    from pipeline.config import grid_points

    assert grid_points(["adaptation.rank=2,4", "adaptation.lr=1e-3"]) == [
        {"adaptation.rank": "2", "adaptation.lr": "1e-3"}, {"adaptation.rank": "4", "adaptation.lr": "1e-3"}]
    with pytest.raises(ConfigError, match="--grid 'sampling.clips_per_batch=1,4': a sweep pairs every arm with one"):
        grid_points(["sampling.clips_per_batch=1,4"])
