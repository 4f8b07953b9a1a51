"""Command line: `python -m pipeline <stage> [--config conf/x.yaml] [--set section.key=value ...]`.

Shortcut options (--rank, --steps, --lr, --alpha, --num-clips) are the same overrides under the
names MLproject uses for its -P parameters. An empty value means "as in the config".
"""
from __future__ import annotations

import sys

import click

from .runtime.cluster import PREEMPTED_EXIT_CODE, Preempted, Shard
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


def slurm_options(func):
    """Where the jobs' tasks record and what each asks SLURM for (submit, sweep --slurm)."""
    for option in reversed([
            click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default="",
                         help="an mlflow server every task can reach (default: $MLFLOW_TRACKING_URI)"),
            click.option("--partition", default=""),
            click.option("--gpus", default=1, show_default=True),
            click.option("--cpus", default=8, show_default=True),
            click.option("--mem", default="64G", show_default=True),
            click.option("--time", "time_limit", default="04:00:00", show_default=True),
            click.option("--scratch", default="/tmp", show_default=True,
                         help="node-local scratch for caches and temp files"),
            click.option("--log-dir", default="slurm/logs", show_default=True),
            click.option("--dry-run", is_flag=True, help="write the sbatch script(s) and print them, do not submit")]):
        func = option(func)
    return func


def _resources(tracking_uri: str, partition: str, gpus: int, cpus: int, mem: str, time_limit: str, scratch: str,
               log_dir: str):
    from .runtime.cluster import Resources

    if not tracking_uri or tracking_uri.startswith("sqlite"):
        raise click.UsageError("a job array needs an mlflow server as the tracking store (--tracking-uri or "
                               "MLFLOW_TRACKING_URI), not a SQLite file (README: 'Running on a SLURM cluster')")
    return Resources(partition, gpus, cpus, mem, time_limit, scratch, log_dir)


def _sets_text(sets: list[str]) -> str:
    import shlex

    return " ".join(f"--set {shlex.quote(s)}" for s in sets)


TASK_ID = '"${SLURM_ARRAY_TASK_ID:-0}"'  # expanded by the task's shell


@main.command()
@config_options("num_clips")
@click.option("--grid", "grid", multiple=True, required=True, metavar="KEY=V1,V2",
              help="a swept setting and its values, e.g. --grid adaptation.rank=4,16 (repeatable: every combination; "
                   "one --grid may hold several space-separated items, as MLproject's -P grid=... passes them)")
@click.option("--slurm", is_flag=True, help="submit one job array over the baseline and the arms x --tasks shards, "
                                            "then a job that evaluates every arm once the array has ended")
@click.option("--tasks", type=int, default=1, show_default=True, help="with --slurm: shards of the clips per arm")
@click.option("--task", "task", type=int, default=None, metavar="I",
              help="run only task I of the sweep's job array: shard I % --tasks of the baseline (I < --tasks) "
                   "or of arm I // --tasks - 1 (what each array task of --slurm runs)")
@slurm_options
def sweep(grid: tuple[str, ...], slurm: bool, tasks: int, task: int | None, tracking_uri: str, dry_run: bool,
          **kw) -> None:
    """Every arm of a grid against one baseline: adapt and evaluate each, then rank them by gain."""
    try:
        points = grid_points(split_items(grid))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    resources = {k: kw.pop(k) for k in ("partition", "gpus", "cpus", "mem", "time_limit", "scratch", "log_dir")}
    sets = kw.pop("sets")
    base = resolve(sets=sets, **kw)
    configs = [resolve(sets=sets + tuple(f"{k}={v}" for k, v in point.items()), **kw) for point in points]
    if tasks < 1:
        raise click.BadParameter("must be at least 1", param_hint="--tasks")
    if slurm:
        _submit_sweep(points, grid, tasks, _resources(tracking_uri, **resources), tracking_uri, dry_run, sets=sets,
                      **kw)
        return
    if task is not None:
        if not 0 <= task < (len(points) + 1) * tasks:
            raise click.BadParameter(f"{task} is not in [0, {(len(points) + 1) * tasks}) for {len(points)} arms "
                                     f"and --tasks {tasks}", param_hint="--task")
        from .stages.sweep import run_sweep_task

        stage, run_id = run_sweep_task(configs, task, tasks)
        _exit_if_clips_failed(stage, run_id)
        return
    from .stages.sweep import run_sweep

    run_sweep(points, configs, base)


def _submit_sweep(points: list[dict[str, str]], grid: tuple[str, ...], tasks: int, resources, tracking_uri: str,
                  dry_run: bool, config_path: str, sets: tuple[str, ...] = (), **shortcuts: str) -> None:
    """The array (the baseline and every arm, each over `tasks` shards), then the sweep itself once the array
    has ended: every finished clip is reused, so it evaluates each arm and ranks them (and redoes any clip a
    task left unfinished)."""
    import shlex

    from .runtime.cluster import render_sbatch, sbatch, write_sbatch

    overrides = [*split_items(sets), *(f"{SHORTCUTS[k]}={v}" for k, v in shortcuts.items() if v != "")]
    sweep = (f"sweep --config {shlex.quote(config_path)} {_sets_text(overrides)} "
             f"--grid {shlex.quote(' '.join(split_items(grid)))} --tasks {tasks}")
    size = (len(points) + 1) * tasks
    array = write_sbatch(render_sbatch(f"{sweep} --task {TASK_ID}", size, tracking_uri, "tta-sweep", resources),
                         "tta-sweep", resources)
    final = write_sbatch(render_sbatch(sweep, 0, tracking_uri, "tta-sweep-evaluate", resources),
                         "tta-sweep-evaluate", resources)
    what = f"{size} tasks: the baseline and {len(points)} arms, {tasks} shard(s) each"
    if dry_run:
        click.echo(array.read_text() + "\n" + final.read_text())
        click.echo(f"# written to {array} ({what}) and {final}; submit with:\n"
                   f"job=$(sbatch --parsable {array}) && sbatch --dependency=afterany:${{job%%;*}} {final}")
        return
    array_id = sbatch(array)
    click.echo(f"submitted job array {array_id} ({what}) and job {sbatch(final, after=array_id)}, which evaluates "
               f"the arms once the array has ended (its log: {resources.log_dir}/tta-sweep-evaluate-*.out)")


@main.command()
@click.option("--stage", type=click.Choice(["baseline", "adapt"]), required=True)
@click.option("--config", default="conf/demo.yaml", show_default=True)
@click.option("--tasks", type=int, required=True, help="job-array size: the clips are split into this many shards")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="config overrides passed to every task")
@slurm_options
def submit(stage: str, config: str, tasks: int, sets: tuple[str, ...], tracking_uri: str, dry_run: bool,
           **resources) -> None:
    """Write the sbatch script of a stage as a job array and submit it with sbatch."""
    import shlex

    from .runtime.cluster import render_sbatch, sbatch, write_sbatch

    resolve(config, sets)  # fail here, not on the cluster, on a bad config
    slurm = _resources(tracking_uri, **resources)
    job = f"tta-{stage}"
    command = f"{stage} --config {shlex.quote(config)} --shard {TASK_ID}/{tasks} {_sets_text(list(sets))}"
    path = write_sbatch(render_sbatch(command, tasks, tracking_uri, job, slurm), job, slurm)
    if dry_run:
        click.echo(path.read_text())
        click.echo(f"# written to {path}; submit with: sbatch {path}")
        return
    click.echo(f"submitted job array {sbatch(path)}")


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
                                               "clips (the first --frames and --sizes) and print their time split, clips "
                                               "per GPU-hour and a whole clip's MFU")
@click.option("--vae", is_flag=True, help="instead: time the LTX-Video VAE (encode context, decode clip) per shape")
@click.option("--sampling", is_flag=True, help="instead: time one baseline sample (50 steps, guidance 1 and 3) per shape")
@click.option("--adaptation", is_flag=True, help="instead: time 20 LoRA r16 steps of --batch clips adapted together "
                                                 "per shape, with the step's MFU")
@click.option("--profile", default="", help="with --adaptation: also profile two steps and write the operator "
                                             "table to this folder")
@click.option("--batch", default="1", show_default=True, help="with --sampling and --adaptation: comma-separated "
                                                               "numbers of clips in one batch; with --stage-clips: "
                                                               "the first is sampling.clips_per_batch")
def bench(frames, sizes, ranks, methods, checkpointing, paths, out, evaluation, stage_clips, vae, sampling,
          adaptation, profile, batch) -> None:
    """Speed and memory of TTA steps on LTX-Video 2B with random weights (needs a GPU)."""
    import json
    import tempfile
    from pathlib import Path

    import torch

    from .benchmarks.ltx_video import adaptation_seconds, evaluation_seconds, grid, run_bench, sampling_seconds
    from .benchmarks.ltx_video import vae_seconds
    from .benchmarks.ltx_video import stage_clips as time_stages  # the option of the same name is a clip count

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    if evaluation:
        click.echo(evaluation_seconds(100, 37, 256, torch.device("cuda")))
        return
    if vae or sampling or adaptation:
        for f in ints(frames):
            for size in ints(sizes):
                for clips in ints(batch) if adaptation else ():
                    click.echo(json.dumps(adaptation_seconds(f, size, torch.device("cuda"), clips,
                                                                  profile_dir=Path(profile) if profile else None)))
                if vae:
                    click.echo(json.dumps(vae_seconds(f, size, torch.device("cuda"))))
                for guidance in (1.0, 3.0) if sampling else ():
                    for clips in ints(batch):
                        click.echo(json.dumps(sampling_seconds(f, size, torch.device("cuda"), guidance,
                                                               batch=clips)))
        return
    if stage_clips:
        with tempfile.TemporaryDirectory() as workdir:
            split = time_stages(Path(workdir), stage_clips, ints(frames)[0], ints(sizes)[0],
                                clips_per_batch=ints(batch)[0])
        click.echo(json.dumps(split, indent=1))
        return
    flags = {"off": [False], "on": [True], "both": [False, True]}[checkpointing]
    cases = grid(ints(frames), ints(sizes), ints(ranks), methods.split(","), flags)
    run_bench(cases, tuple(paths.split(",")), out or None)


@main.command("bench-backend")
@click.option("--config", "config_path", required=True, help="an Open-Sora or SkyReels-V2 preset, e.g. "
                                                            "conf/opensora13-naive.yaml")
@click.option("--steps", default=8, show_default=True, help="adaptation steps timed (the median of all but the first "
                                                         "two, which compile and record)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="config overrides")
@click.option("--profile", default="", help="also profile two adaptation steps and one sampler step and "
                                            "write their operator tables to this folder")
@click.option("--stage-clips", default=0, help="instead: run the baseline and adapt stages on this many synthetic "
                                               "clips of the preset's shape and print their time split, clips per GPU-hour "
                                               "and a whole clip's MFU")
def bench_backend(config_path: str, steps: int, sets: tuple[str, ...], profile: str, stage_clips: int) -> None:
    """Real-size Open-Sora or SkyReels-V2 with random weights on a GPU: text encoders, adaptation steps,
    sampling, their FLOPs and MFU, peak memory, at the preset's clip shape."""
    import json
    import tempfile
    from pathlib import Path

    from .benchmarks import released_size

    if stage_clips:
        with tempfile.TemporaryDirectory() as workdir:
            split = released_size.stage_clips(config_path, parse_sets(sets), Path(workdir), stage_clips)
        click.echo(json.dumps(split, indent=1))
        return
    click.echo(json.dumps(released_size.measure(config_path, parse_sets(sets), steps,
                                                Path(profile) if profile else None)))


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
