"""Command line: `python -m pipeline <stage> [--config conf/x.yaml] [--set section.key=value ...]`.

Shortcut options (--rank, --steps, --lr, --alpha, --num-clips) are the same overrides under the
names MLproject uses for its -P parameters. An empty value means "as in the config".
"""
from __future__ import annotations

import sys

import click
import mlflow

from .config import ConfigError, load_config

SHORTCUTS = {"rank": "adaptation.rank", "steps": "adaptation.steps", "lr": "adaptation.lr",
             "alpha": "adaptation.alpha", "num_clips": "data.num_clips"}


def config_options(func):
    func = click.option("--config", "config_path", default="conf/demo.yaml", show_default=True,
                        help="YAML preset in conf/")(func)
    func = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="override a config value, e.g. --set adaptation.rank=16 (repeatable)")(func)
    for name, key in reversed(SHORTCUTS.items()):
        func = click.option(f"--{name.replace('_', '-')}", name, default="", help=f"same as --set {key}=...")(func)
    return func


def resolve(config_path: str, sets: tuple[str, ...], **shortcuts: str):
    overrides = {}
    for item in sets:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    overrides.update({SHORTCUTS[name]: value for name, value in shortcuts.items() if value != ""})
    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group()
def main() -> None:
    """Test-time adaptation of video diffusion models for video continuation."""


@main.command()
@config_options
def preprocess(**kw) -> None:
    """Write fixed-size clips and their manifest (synthetic generator or a folder of videos)."""
    from .stages.preprocess import run_preprocess

    run_preprocess(resolve(**kw))


@main.command()
@config_options
def pretrain(**kw) -> None:
    """Pretrain the small default model on the train split (skipped when up to date)."""
    from .stages.pretrain import pretrain as run

    run(resolve(**kw))


@main.command()
@config_options
def baseline(**kw) -> None:
    """Continue each clip with the frozen model and score it."""
    from .stages.continuation import run_stage

    run_stage(resolve(**kw), "baseline")


@main.command()
@config_options
def adapt(**kw) -> None:
    """Adapt the model to each clip (LoRA, reset per clip), then continue and score it."""
    from .stages.continuation import run_stage

    run_stage(resolve(**kw), "adapt")


@main.command()
@config_options
def evaluate(**kw) -> None:
    """Pair the baseline and adapted arms by clip: statistics, metrics.json, plots."""
    from .stages.evaluate import evaluate as run

    run(resolve(**kw))


@main.command()
@config_options
def experiment(**kw) -> None:
    """The whole experiment: preprocess, pretrain (small default), baseline, adapt, evaluate."""
    from .stages.experiment import run_experiment

    run_experiment(resolve(**kw))


@main.command("fetch-weights")
def fetch_weights() -> None:
    """Download LPIPS's AlexNet backbone once (on a machine with internet) into the torch hub cache."""
    from .evaluation.metrics import fetch_lpips_weights

    click.echo(f"AlexNet weights at {fetch_lpips_weights()}")


def run() -> None:
    try:
        main(standalone_mode=True)
    finally:
        if mlflow.active_run() is not None:  # a crash leaves no run dangling as RUNNING
            mlflow.end_run("FAILED" if sys.exc_info()[0] else "FINISHED")
