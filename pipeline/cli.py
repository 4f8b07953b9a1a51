"""Command line: `python -m pipeline <stage> [--config conf/x.yaml] [--set section.key=value ...]`.

Shortcut options (--rank, --steps, --lr, --alpha, --num-clips) are the same overrides under the
names MLproject uses for its -P parameters. An empty value means "as in the config".
"""
from __future__ import annotations

import sys

import click

from .cluster import PREEMPTED_EXIT_CODE, Preempted, Shard
from .config import ConfigError, grid_points, load_config

CLIPS_FAILED_EXIT_CODE = 3  # the stage ran to its end, but some clips failed (each run's tta.error says why)
SHORTCUTS = {"rank": "adaptation.rank", "steps": "adaptation.steps", "lr": "adaptation.lr",
             "alpha": "adaptation.alpha", "num_clips": "data.num_clips"}


def config_options(*shortcuts: str):
    """--config, --set and the named shortcut options (each command lists only those it uses)."""
    def decorate(func):
        func = click.option("--config", "config_path", default="conf/demo.yaml", show_default=True,
                            help="YAML preset in conf/")(func)
        func = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                            help="override config values, e.g. --set adaptation.rank=16 (repeatable; one --set "
                                 "may hold several space-separated pairs, as MLproject's -P set=... passes them)")(func)
        for name in reversed(shortcuts):
            func = click.option(f"--{name.replace('_', '-')}", name, default="",
                                help=f"same as --set {SHORTCUTS[name]}=...")(func)
        return func
    return decorate


ARM = ("rank", "steps", "lr", "alpha", "num_clips")  # the shortcuts of commands that run or read an arm


def split_items(texts: tuple[str, ...]) -> list[str]:
    """Repeated options whose values may each hold several space-separated items (as MLproject's
    -P set=... and -P grid=... pass them)."""
    return [item for text in texts for item in text.split()]


def parse_sets(sets: tuple[str, ...]) -> dict[str, str]:
    overrides = {}
    for item in split_items(sets):
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def resolve(config_path: str, sets: tuple[str, ...], **shortcuts: str):
    overrides = parse_sets(sets)
    overrides.update({SHORTCUTS[name]: value for name, value in shortcuts.items() if value != ""})
    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group()
def main() -> None:
    """Test-time adaptation of video diffusion models for video continuation."""


@main.command()
@config_options("num_clips")
def preprocess(**kw) -> None:
    """Write fixed-size clips and their manifest (synthetic generator or a folder of videos)."""
    config = resolve(**kw)  # before the heavy imports: a config error answers at once
    from .stages.preprocess import run_preprocess

    run_preprocess(config)


@main.command()
@config_options()
def pretrain(**kw) -> None:
    """Pretrain the small default model on the train split (skipped when up to date)."""
    config = resolve(**kw)
    from .stages.pretrain import pretrain as run

    run(config)


def shard_option(func):
    return click.option("--shard", default="", metavar="I/N",
                        help="run only shard I of N of the clips (default: SLURM's array task, else all)")(func)


@main.command()
@config_options("num_clips")
@shard_option
def baseline(shard: str, **kw) -> None:
    """Continue each clip with the frozen model and score it."""
    config, shard = resolve(**kw), Shard.parse(shard)
    from .stages.continuation import run_stage

    _exit_if_clips_failed("baseline", run_stage(config, "baseline", shard=shard))


@main.command()
@config_options(*ARM)
@shard_option
def adapt(shard: str, **kw) -> None:
    """Adapt the model to each clip (LoRA, reset per clip), then continue and score it."""
    config, shard = resolve(**kw), Shard.parse(shard)
    from .stages.continuation import run_stage

    _exit_if_clips_failed("adapt", run_stage(config, "adapt", shard=shard))


def _exit_if_clips_failed(stage: str, run_id: str) -> None:
    """The last line says how many clips failed, and the exit code is CLIPS_FAILED_EXIT_CODE."""
    if not run_id:  # nothing was left to do, or a rank > 0 of a multi-GPU run (rank 0 reports)
        return
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient().get_run(run_id).data.metrics
    failed, total = int(metrics.get("clips_failed", 0)), int(metrics.get("clips_total", 0))
    if failed:
        click.echo(f"[{stage}] {failed} of {total} clips failed (each clip run's tta.error tag says why); "
                   f"exit code {CLIPS_FAILED_EXIT_CODE}", err=True)
        sys.exit(CLIPS_FAILED_EXIT_CODE)


@main.command()
@config_options(*ARM)
def evaluate(**kw) -> None:
    """Pair the baseline and adapted arms by clip: statistics, metrics.json, plots."""
    config = resolve(**kw)
    from .stages.evaluate import evaluate as run

    run(config)


@main.command()
@config_options(*ARM)
def experiment(**kw) -> None:
    """The whole experiment: preprocess, pretrain (small default), baseline, adapt, evaluate."""
    config = resolve(**kw)
    from .stages.experiment import run_experiment

    run_experiment(config)


@main.command()
@config_options("num_clips")
@click.option("--grid", "grid", multiple=True, required=True, metavar="KEY=V1,V2",
              help="a swept setting and its values, e.g. --grid adaptation.rank=4,16 (repeatable: every combination; "
                   "one --grid may hold several space-separated items, as MLproject's -P grid=... passes them)")
def sweep(grid: tuple[str, ...], **kw: str) -> None:
    """Every arm of a grid against one baseline: adapt and evaluate each, then rank them by gain."""
    try:
        points = grid_points(split_items(grid))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    sets = kw.pop("sets")
    configs = [resolve(sets=sets + tuple(f"{k}={v}" for k, v in point.items()), **kw) for point in points]
    from .stages.sweep import run_sweep

    run_sweep(points, configs)


@main.command()
@click.option("--stage", type=click.Choice(["baseline", "adapt"]), required=True)
@click.option("--config", default="conf/demo.yaml", show_default=True)
@click.option("--tasks", type=int, required=True, help="job-array size: the clips are split into this many shards")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", required=True,
              help="an mlflow server every task can reach (default: $MLFLOW_TRACKING_URI)")
@click.option("--partition", default="")
@click.option("--gpus", default=1, show_default=True)
@click.option("--cpus", default=8, show_default=True)
@click.option("--mem", default="64G", show_default=True)
@click.option("--time", "time_limit", default="04:00:00", show_default=True)
@click.option("--scratch", default="/tmp", show_default=True, help="node-local scratch for caches and temp files")
@click.option("--log-dir", default="slurm/logs", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="config overrides passed to every task")
@click.option("--dry-run", is_flag=True, help="write the sbatch script and print it, do not submit")
def submit(stage, config, tasks, tracking_uri, partition, gpus, cpus, mem, time_limit, scratch, log_dir, sets,
           dry_run) -> None:
    """Write the sbatch script of a stage as a job array and submit it with sbatch."""
    import shlex
    import subprocess
    from pathlib import Path

    from .cluster import render_sbatch

    resolve(config, sets)  # fail here, not on the cluster, on a bad config
    if tracking_uri.startswith("sqlite"):
        raise click.UsageError("a job array needs an mlflow server as the tracking store, not a SQLite file "
                               "(README: 'Running on a SLURM cluster')")
    extra = " ".join(f"--set {shlex.quote(s)}" for s in sets)
    job = f"tta-{stage}"
    script = render_sbatch(stage, config, tasks, tracking_uri, job, partition, gpus, cpus, mem, time_limit,
                           scratch, str(Path(log_dir).resolve()), extra)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path("slurm") / "rendered" / f"{job}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if dry_run:
        click.echo(script)
        click.echo(f"# written to {path}; submit with: sbatch {path}")
        return
    click.echo(subprocess.run(["sbatch", str(path)], check=True, capture_output=True, text=True).stdout.strip())


@main.command("download-dataset")
@click.argument("name", type=click.Choice(["ucf101", "hmdb51"]))
@click.option("--dest", required=True, help="folder for the archives and the extracted videos")
def download_dataset(name: str, dest: str) -> None:
    """Download and extract UCF-101 or HMDB51 with its official split lists (run once, on a login node)."""
    from pathlib import Path

    from .data.datasets import LAYOUT, download_dataset as run

    videos = run(name, Path(dest))
    splits = Path(dest) / LAYOUT[name][1]
    click.echo(f"videos in {videos}, split lists in {splits}; preprocess with:\n  python -m pipeline preprocess "
               f"--set data.source={name} --set data.input_dir={videos} --set data.splits_dir={splits}")


@main.command()
@click.option("--frames", default="65,97,121", show_default=True, help="comma-separated clip lengths (8k+1)")
@click.option("--sizes", default="256,512", show_default=True, help="comma-separated square sides in pixels")
@click.option("--ranks", default="16,64", show_default=True)
@click.option("--methods", default="lora,full", show_default=True)
@click.option("--checkpointing", type=click.Choice(["off", "on", "both"]), default="both", show_default=True)
@click.option("--paths", default="plain,fast", show_default=True, help="plain (the reference) and/or fast")
@click.option("--out", default="", help="also append one JSON line per result to this file")
@click.option("--evaluation", is_flag=True, help="time every metric of 100 clips x 37 frames x 256 px instead")
@click.option("--stage-clips", default=0, help="instead: run the baseline and adapt stages on this many synthetic "
                                               "clips (the first --frames and --sizes) and print their time split")
@click.option("--vae", is_flag=True, help="instead: time the LTX-Video VAE (encode context, decode clip) per shape")
@click.option("--sampling", is_flag=True, help="instead: time one baseline sample (50 steps, guidance 1 and 3) per shape")
def bench(frames, sizes, ranks, methods, checkpointing, paths, out, evaluation, stage_clips, vae, sampling) -> None:
    """Speed and memory of TTA steps on LTX-Video 2B with random weights (needs a GPU)."""
    import json
    import tempfile
    from pathlib import Path

    import torch

    from .bench import evaluation_seconds, grid, run_bench, sampling_seconds, vae_seconds
    from .bench import stage_clips as time_stages  # the option of the same name is a clip count

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    if evaluation:
        click.echo(evaluation_seconds(100, 37, 256, torch.device("cuda")))
        return
    if vae or sampling:
        for f in ints(frames):
            for size in ints(sizes):
                if vae:
                    click.echo(json.dumps(vae_seconds(f, size, torch.device("cuda"))))
                for guidance in (1.0, 3.0) if sampling else ():
                    click.echo(json.dumps(sampling_seconds(f, size, torch.device("cuda"), guidance)))
        return
    if stage_clips:
        with tempfile.TemporaryDirectory() as workdir:
            split = time_stages(Path(workdir), stage_clips, ints(frames)[0], ints(sizes)[0])
        click.echo(json.dumps(split, indent=1))
        return
    flags = {"off": [False], "on": [True], "both": [False, True]}[checkpointing]
    cases = grid(ints(frames), ints(sizes), ints(ranks), methods.split(","), flags)
    run_bench(cases, tuple(paths.split(",")), out or None)


@main.command("bench-opensora")
@click.option("--config", "config_path", required=True, help="an Open-Sora preset, e.g. conf/opensora13-naive.yaml")
@click.option("--steps", default=4, show_default=True, help="adaptation steps timed (the first is reported apart)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="config overrides")
def bench_opensora(config_path: str, steps: int, sets: tuple[str, ...]) -> None:
    """Real-size Open-Sora with random weights on a GPU: text encoders, one adaptation step, sampling,
    peak memory, at the preset's clip shape."""
    import json

    from .bench_opensora import measure

    click.echo(json.dumps(measure(config_path, parse_sets(sets), steps)))


@main.command("fetch-weights")
def fetch_weights() -> None:
    """Download the metrics' networks once (on a machine with internet) into the torch hub cache:
    AlexNet (LPIPS, FloLPIPS), RAFT-small (FloLPIPS), I3D (FVD)."""
    from .evaluation.weights import fetch_all

    for name, path in fetch_all().items():
        click.echo(f"{name} weights at {path}")


def run() -> None:
    try:
        main(standalone_mode=True)
    except Preempted as exc:
        click.echo(f"{exc}: the current clip was abandoned; rerun (or requeue) to resume", err=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (ConfigError, FileNotFoundError) as exc:  # a setup problem the message names: one line, no traceback
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    finally:
        mlflow = sys.modules.get("mlflow")  # imported by the stages only
        if mlflow is not None and mlflow.active_run() is not None:  # a crash leaves no run dangling as RUNNING
            mlflow.end_run("FAILED" if sys.exc_info()[0] else "FINISHED")
