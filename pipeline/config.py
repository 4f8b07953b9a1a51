"""Experiment configuration: YAML presets in conf/, validated against these dataclasses.

Any value can be overridden as `section.key=value` (CLI `--set`, MLproject `-P`). Errors name the
bad key. The resolved config is what gets logged as MLflow params and hashed for resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | folder | ucf101 | hmdb51
    input_dir: str = ""  # folder, ucf101, hmdb51: one sub-folder per class
    splits_dir: str = ""  # ucf101, hmdb51: the official split lists
    split_id: int = 1  # ucf101, hmdb51: which official split (1-3)
    sample: int = 0  # videos per split, stratified by class (0 = all)
    start_frame: int = 0  # first source frame of each clip
    output_dir: str = ""  # where preprocess writes clips, manifest.csv and config.yaml ("": data/synthetic, or data/<input folder's name>)
    frames: int = 16  # T
    context: int = 8  # K
    height: int = 32
    width: int = 32
    fps: float = 8.0
    train_clips: int = 512  # synthetic source: clips pretraining renders in memory (preprocess writes only the test split)
    test_clips: int = 16  # synthetic source; folder source: share of videos held out below
    test_fraction: float = 0.2  # folder source: share of videos held out as test
    split: str = "test"  # the split that baseline/adapt run on
    num_clips: int = 8  # 0 = every clip of the split
    seed: int = 0  # synthetic clip generation and the per-class sample of videos (data.sample)

    @property
    def manifest(self) -> Path:
        return Path(self.output_dir) / "manifest.csv"


@dataclass
class LTXVideoOptions:
    """The model.* settings that only the ltx-video backend reads."""

    weights: str = "checkpoints/ltx-small.safetensors"  # small default, written by pretrain
    patch_size: int = 8  # the small default's architecture: patch_size, layers, heads, head_dim
    layers: int = 4
    heads: int = 8
    head_dim: int = 32
    vae_posterior: str = "sample"  # the context latents are a draw from the VAE posterior (as LTXConditionPipeline) | mode
    decode_timestep: float = 0.0  # VAEs with timestep conditioning: decode at this timestep...
    decode_noise_scale: float | None = None  # ...after mixing in this much noise (None: decode_timestep)


@dataclass
class OpenSoraOptions:
    """The model.* settings that both Open-Sora backends read."""

    vae: str = ""  # VAE checkpoint; empty = random weights
    text_encoder: str = ""  # T5 (hub id or directory), needed for a non-empty prompt
    portable_kernels: bool = False  # upstream's xformers/flash-attn/Liger calls in plain torch
    conditioning: str = "reference"  # upstream's sampler and loss as released | clean_prefix (docs/backends.md)


@dataclass
class OpenSoraV20Options:
    """The model.* settings that only the opensora-v2.0 backend reads."""

    clip_encoder: str = ""  # CLIP text model


def _options(cls: type) -> dataclasses.Field:
    """A backend's options inside a section: their keys are the section's own (`model.vae_posterior`)."""
    return field(default_factory=cls, metadata={"options": True})


@dataclass
class ModelConfig:
    backend: str = "ltx-video"  # ltx-video | opensora-v1.3 | opensora-v2.0 | skyreels-v2
    pretrained: str = ""  # hub id or local checkpoint; empty = the small default (ltx) or random weights (opensora, skyreels)
    size: str = "full"  # opensora-*, skyreels-v2 with random weights: full (the released architecture) | tiny (tests)
    gradient_checkpointing: bool = False
    prompt: str = ""
    negative_prompt: str = ""  # ltx-video, skyreels-v2: the unconditional branch of classifier-free guidance
    dtype: str = "float32"  # float32 | bfloat16
    cache_latents: bool = True  # VAE latents of each clip's context kept on disk, shared by every arm
    compile: bool = False  # ltx-video, opensora-* on GPUs: each transformer block through torch.compile (docs/benchmarks.md)
    ltx_video: LTXVideoOptions = _options(LTXVideoOptions)
    opensora: OpenSoraOptions = _options(OpenSoraOptions)
    opensora_v20: OpenSoraV20Options = _options(OpenSoraV20Options)


@dataclass
class PretrainConfig:
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    unconditional_prob: float = 0.1  # share of steps trained with no clean prefix
    ema: float = 0.0  # > 0: the weights written are an exponential moving average of the trained ones, this decay per step
    seed: int = 0  # the small default's initial weights, batches and noise


@dataclass
class SamplingConfig:
    steps: int = 50
    seed: int = 0  # sampling noise: each clip's sample n draws from a seed derived from (seed, clip id, n)
    samples: int = 1  # continuations per clip, each from its own derived seed (the same in every arm)
    clips_per_batch: int = 1  # clips sampled in one batch and, with LoRA, adapted together (each its own adapter); equal to one at a time up to float rounding; LoRA on an H100: 4 clips adapt 1.75x faster per clip (docs/benchmarks.md)
    schedule: str = "linear_quadratic"  # ltx-video: LTXConditionPipeline's sigmas | linear (the scheduler's own spacing, with shift)
    shift: float = 1.0  # ltx-video, schedule=linear: the flow shift
    cond_noise_scale: float = 0.15  # ltx-video: context tokens re-noised by this x sigma^2 each step (the pipeline's image_cond_noise_scale; 0 = kept clean)
    guidance: float = 3.0  # text classifier-free guidance scale (1 = off), against model.negative_prompt
    image_guidance: float = 1.0  # opensora: guidance on the video condition (1 = off)


@dataclass
class AdaptationConfig:
    method: str = "lora"  # lora | full (every transformer weight) | select (best of N noises) | noise (noise optimisation): pipeline/adaptation
    data: str = "context"  # context: frames [0, K) | oracle: whole clip (upper bound) | other: another clip's context (sham control)
    objective: str = "continuation"  # continuation (random clean prefix) | v2v_head (first half clean) | denoising
    timesteps: str = "model"  # the noise-level draw: model (as the model family trains: docs/backends.md) | logit_normal
    prompt_dropout: float = 0.05  # ltx-video: share of samples trained on the negative prompt, so guidance's unconditional branch adapts too (finetrainers' LTX-Video rate)
    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention"  # attention | attention+mlp
    lr: float = 1e-3
    steps: int = 40
    eval_at: str = ""  # e.g. "0,10,20": also sample and score each clip after these steps of the same adaptation (each an arm of its own, keyed as adaptation.steps=s)
    warmup: int = 4
    batch_size: int = 4  # noise draws of the same clip per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    deepspeed: bool = True  # method full on a GPU: DeepSpeed ZeRO (partitioned optimizer state, offload); false: torch AdamW, faster on one GPU; both keep fp32 masters of bf16 weights
    zero_stage: int = 2  # 0-2
    offload: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    candidates: int = 8  # select: noises tried per sample (the first is the sample's own)
    proxy_frames: int = 2  # select, noise: the last m context latent frames the proxy predicts from the rest
    proxy_steps: int = 0  # select, noise: the proxy's sampler steps (0: sampling.steps)
    init_seed: int = 0  # the LoRA adapters' initial weights, the same for every clip
    noise_seed: int = 0  # training noise and clean-prefix draws: per clip from (noise_seed, clip id)
    save_weights: bool = False  # lora only: each clip's adapted LoRA weights as clip/lora.safetensors


@dataclass
class EvaluationConfig:
    lpips: bool = True
    lpips_net: str = "alex"


@dataclass
class Config:
    experiment: str = ""  # the MLflow experiment every stage records into ("": the data folder's name)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def flat(self) -> dict[str, object]:
        """Every value as `section.key` -> value, for MLflow params."""
        return dict(_flatten(self))

    def sections(self) -> dict[str, object]:
        """Every value by section and key, as a preset writes them (a YAML file `load_config` reads)."""
        return _tree(self)

    def with_setting(self, key: str, value: object) -> Config:
        """A copy with the setting `key` (as in `flat()`) set to `value`, unchecked."""
        return _replaced(self, key.split("."), value)

    def digest(self, *selectors: str, exclude: Iterable[str] = ()) -> str:
        """A short hash of the values under the selectors (a section such as 'model' or a key such as
        'data.frames'), leaving out the keys in `exclude`."""
        excluded = set(exclude)
        values = {k: v for k, v in self.flat().items()
                  if k not in excluded and any(k == s or k.startswith(s + ".") for s in selectors)}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# The settings that cannot change a clip's result, and why; every other setting is part of the key of
# the results it can change (tests/test_config.py walks every field).
NOT_RESULT_SETTINGS = {
    "experiment",  # the MLflow experiment's name: where results are stored
    "data.num_clips",  # which clips are selected, not what a clip's result is
    "adaptation.save_weights",  # whether the adapted weights are also written out
    # which earlier steps of the same adaptation are also scored; each is the result of its own arm,
    # keyed as adaptation.steps=s, bit for bit (tests/test_adaptation.py::test_a_step_of_eval_at_is_the_arm_of_that_many_steps)
    "adaptation.eval_at",
    "model.cache_latents",  # the cached latents are the encoder's output, bit for bit (tests/test_latent_cache.py)
    "model.weights",  # a path: the weights actually loaded are fingerprinted into the key instead
    "pretrain.steps", "pretrain.batch_size", "pretrain.lr", "pretrain.warmup", "pretrain.unconditional_prob",
    "pretrain.seed", "pretrain.ema",  # pretraining reaches results only through the weights, which are fingerprinted
}

CHOICES = {
    "data.source": {"synthetic", "folder", "ucf101", "hmdb51"},
    "model.backend": {"ltx-video", "opensora-v1.3", "opensora-v2.0", "skyreels-v2"},
    "model.size": {"full", "tiny"},
    "model.dtype": {"float32", "bfloat16"},
    "model.vae_posterior": {"sample", "mode"},
    "model.conditioning": {"reference", "clean_prefix"},
    "sampling.schedule": {"linear_quadratic", "linear"},
    "adaptation.method": {"lora", "full", "select", "noise"},
    "adaptation.data": {"context", "oracle", "other"},
    "adaptation.objective": {"continuation", "v2v_head", "denoising"},
    "adaptation.targets": {"attention", "attention+mlp"},
    "adaptation.timesteps": {"model", "logit_normal"},
}


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides (empty values are ignored)."""
    raw: dict = {}
    source = "defaults"
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        raw = _read_preset(path)
        source = str(path)
    for key, value in (overrides or {}).items():
        if value == "" or value is None:
            continue
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    try:
        config = _build(Config, raw, prefix="", source=source)
        _derive(config)
        _check(config, source)
    except ConfigError as exc:  # name the override that caused it, not the file
        culprit = next((k for k in overrides or {} if f"'{k}'" in str(exc) and overrides[k] not in ("", None)), None)
        if culprit is None:
            raise
        raise ConfigError(f"override {culprit}={overrides[culprit]}: {str(exc).removeprefix(source + ': ')}") from None
    return config


def _read_preset(path: Path) -> dict:
    """A YAML preset; `base: other.yaml` (beside it) supplies every value it does not set."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if "base" not in raw:
        return raw
    base = path.parent / str(raw.pop("base"))
    if not base.exists():
        raise ConfigError(f"{path}: base preset {base} does not exist")
    return _merged(_read_preset(base), raw)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _derive(config: Config) -> None:
    """The defaults that follow from other values: a dataset's own folder, an experiment named after it."""
    d = config.data
    if not d.output_dir:
        d.output_dir = "data/synthetic" if d.source == "synthetic" else f"data/{Path(d.input_dir).name or d.source}"
    if not config.experiment:
        config.experiment = Path(d.output_dir).name


def grid_points(grid: list[str]) -> list[dict[str, str]]:
    """`key=v1,v2` items -> every combination as overrides, in the order given."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r}: expected KEY=VALUE1,VALUE2,...")
        if not key.strip().startswith("adaptation."):
            raise ConfigError(f"--grid {item!r}: a sweep pairs every arm with one baseline, so it sweeps adaptation.* "
                              "settings only (others change the baseline: run a sweep per value)")
        axes.append([(key.strip(), v.strip()) for v in values.split(",") if v.strip()])
    return [dict(point) for point in itertools.product(*axes)]


def _build(cls, raw: dict, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be a section (a mapping)")
    hints = typing.get_type_hints(cls)
    options = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("options")}
    owner = {f.name: name for name, kind in options.items() for f in dataclasses.fields(kind)}
    known = {f.name for f in dataclasses.fields(cls) if f.name not in options} | set(owner)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    values = {name: _build(kind, {k: v for k, v in raw.items() if owner.get(k) == name}, prefix, source)
              for name, kind in options.items()}
    for name, value in raw.items():
        if name in owner:
            continue
        kind = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, key + ".", source)
        else:
            values[name] = _coerce(kind, value, key, source)
    return cls(**values)


def _coerce(kind, value, key: str, source: str):
    if isinstance(kind, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {kind.__name__}, got {value!r}")
    return kind(value)


def _check(config: Config, source: str) -> None:
    flat = config.flat()
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{source}: '{key}' is {flat[key]!r}; choose one of {sorted(allowed)}")
    if config.adaptation.method == "lora" and config.adaptation.rank < 1:
        raise ConfigError(f"{source}: 'adaptation.rank' is {config.adaptation.rank}; LoRA needs a rank of at least 1 "
                          "(0 adaptation steps give the unadapted model: adaptation.steps=0)")
    if config.adaptation.method in ("select", "noise") and config.adaptation.data == "oracle":
        raise ConfigError(f"{source}: adaptation.method={config.adaptation.method!r} judges noises by predicting the "
                          "window's last frames from the rest; the oracle's window is the whole clip, with nothing "
                          "after it to continue (use adaptation.data=context or other)")
    eval_points(config.adaptation, source)
    a = config.adaptation
    if config.sampling.clips_per_batch > 1 and a.method != "lora":
        raise ConfigError(f"{source}: 'sampling.clips_per_batch' also adapts several clips at once, with a LoRA "
                          "adapter each; it takes adaptation.method=lora")
    if config.model.compile and config.model.backend not in ("ltx-video", "opensora-v1.3", "opensora-v2.0"):
        raise ConfigError(f"{source}: 'model.compile' compiles the transformer blocks of LTX-Video and Open-Sora; "
                          f"model.backend={config.model.backend} runs uncompiled (model.compile=false)")
    if config.model.compile and config.adaptation.grad_accum > 1:
        raise ConfigError(f"{source}: 'model.compile' records the blocks as CUDA graphs, whose gradient outputs the "
                          "next micro-batch overwrites; with adaptation.grad_accum > 1 set model.compile=false "
                          "(or raise adaptation.batch_size instead)")
    if config.model.compile and config.model.gradient_checkpointing and config.model.backend.startswith("opensora"):
        raise ConfigError(f"{source}: 'model.compile' records Open-Sora's blocks as CUDA graphs, which upstream's "
                          "gradient checkpointing around each block would break; set one of model.compile and "
                          "model.gradient_checkpointing to false")
    if config.adaptation.offload and not config.adaptation.deepspeed:
        raise ConfigError(f"{source}: 'adaptation.offload' moves DeepSpeed's optimizer state to the CPU; "
                          "it needs adaptation.deepspeed=true")
    if config.adaptation.save_weights and config.adaptation.method != "lora":
        raise ConfigError(f"{source}: 'adaptation.save_weights' keeps LoRA weights; with adaptation.method="
                          f"{config.adaptation.method!r} it would write every transformer weight per clip")
    d = config.data
    if not 0 < d.context < d.frames:
        raise ConfigError(f"{source}: 'data.context' ({d.context}) must be between 1 and data.frames-1 ({d.frames - 1})")
    for key, value in flat.items():
        if not isinstance(value, (int, float)):
            continue
        if key.endswith(("steps", "rank", "batch_size", "height", "width", "frames")) and value < 0:
            raise ConfigError(f"{source}: '{key}' must not be negative")
        if key.endswith(("batch_size", "grad_accum", "samples", "clips_per_batch")) and value < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1")


def eval_points(adaptation: AdaptationConfig, source: str = "config") -> list[int]:
    """adaptation.eval_at as the sorted steps before adaptation.steps at which each clip is also scored."""
    text, steps = str(adaptation.eval_at), adaptation.steps
    try:
        points = sorted({int(item) for item in text.replace(" ", "").split(",") if item})
    except ValueError:
        raise ConfigError(f"{source}: 'adaptation.eval_at' is {text!r}; expected steps separated by commas, "
                          "e.g. 0,10,20") from None
    if points and adaptation.method == "select":
        raise ConfigError(f"{source}: 'adaptation.eval_at' scores earlier steps of an adaptation; "
                          "adaptation.method='select' takes no steps (sweep adaptation.candidates instead)")
    if points and not 0 <= points[0] <= points[-1] < steps:
        raise ConfigError(f"{source}: 'adaptation.eval_at' is {text!r}; each step must lie in [0, adaptation.steps) "
                          f"= [0, {steps}) (the last, adaptation.steps itself, is always scored)")
    return points


def _fields(node) -> dict[str, object]:
    """A config dataclass's settings by key: its own fields, and the fields of its backends' options."""
    values = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        values.update(_fields(value) if f.metadata.get("options") else {f.name: value})
    return values


def _tree(node) -> dict[str, object]:
    return {key: _tree(value) if dataclasses.is_dataclass(value) else value for key, value in _fields(node).items()}


def _flatten(node, prefix: str = ""):
    for key, value in _fields(node).items():
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _replaced(node, path: list[str], value: object):
    name = path[0]
    if name not in _fields(node):
        raise KeyError(name)
    for f in dataclasses.fields(node):
        options = getattr(node, f.name)
        if f.metadata.get("options") and name in _fields(options):
            return dataclasses.replace(node, **{f.name: _replaced(options, path, value)})
    child = value if len(path) == 1 else _replaced(getattr(node, name), path[1:], value)
    return dataclasses.replace(node, **{name: child})
