"""MLflow runs: one parent run per stage invocation, one child run per clip, and resume.

A clip's result is identified by (stage, config digest, clip id, the content hash of the frames it
was made from, the fingerprint of the model weights loaded). Rerunning a stage skips clips that
already have a FINISHED child run with that key; child runs left RUNNING by a killed process are
marked KILLED when their clip is redone, so each clip ends with exactly one finished result; stage
runs left RUNNING are marked KILLED by the next run of the same stage, digest and shard.
"""
from __future__ import annotations

import functools
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ..runtime.cluster import Preempted, Shard
from ..config import Config
from ..evaluation.stats import per_frame_curve

TAG_STAGE, TAG_DIGEST, TAG_CLIP = "tta.stage", "tta.digest", "tta.clip_id"
TAG_CLASS, TAG_SOURCE, TAG_ERROR, TAG_KIND = "tta.class", "tta.source", "tta.error", "tta.kind"
TAG_INPUTS, TAG_WEIGHTS = "tta.inputs", "tta.weights"  # content hash of the clip's frames used; model fingerprint
TAG_PARTNER = "tta.partner"  # the sham arm: the clip whose context was adapted on
TAG_SHARD = "tta.shard"  # a stage run's part of the clips: I/N
TAG_MOVED = "tta.moved_to"  # a run `mlflow run` opened outside the config's experiment: where the results went
TAG_NOTHING_TO_DO = "tta.nothing_to_do"  # a run `mlflow run` opened for a stage whose clips all had results
TAG_ARMS_RECORD = "tta.arms_record"  # a run whose artifact ARMS_RECORD lists arms to show together
ARMS_RECORD = "sweep.json"


@functools.cache
def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def get_or_create_experiment(name: str) -> str:
    """The experiment `name`, created if new."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name)
    except MlflowException as exc:  # several workers of one array can race to create it
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise exc
        return experiment.experiment_id


def _launcher_run(experiment_id: str) -> str | None:
    """The run `mlflow run` opened for this process, if it is in the config's experiment. One opened
    elsewhere (`Default` when no --experiment-name is given) only points at the config's experiment
    (tag `tta.moved_to`; `mlflow run` ends it), so that every stage of a config meets in the
    experiment it names."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id is None or mlflow.active_run() is not None:
        return None
    client = MlflowClient()
    if client.get_run(run_id).info.experiment_id == experiment_id:
        return run_id
    name = mlflow.get_experiment(experiment_id).name
    client.set_tag(run_id, TAG_MOVED, name)
    client.set_tag(run_id, "mlflow.runName", f"moved to {name}")
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    return None


def name_launcher_run_idle(note: str) -> None:
    """The run `mlflow run` opened for an invocation with nothing to record only says so (tag
    `tta.nothing_to_do`); it cannot be deleted, because `mlflow run` ends it after this process."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id is not None:
        MlflowClient().set_tag(run_id, TAG_NOTHING_TO_DO, note)
        MlflowClient().set_tag(run_id, "mlflow.runName", note)


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def close_stale_stage_runs(experiment_id: str, stage: str, digest: str, shard: Shard = Shard()) -> None:
    """Stage runs of this stage, digest and shard left RUNNING by a process that died (kill -9, a node
    lost): only one process works on a shard at a time, so whoever runs it next marks them KILLED."""
    stale = search_all(experiment_id, f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_DIGEST}` = '{digest}' "
                                   f"and tags.`{TAG_SHARD}` = '{shard}' and tags.`{TAG_KIND}` = 'stage' "
                                   "and attributes.status = 'RUNNING'")
    for run in stale:
        MlflowClient().set_tag(run.info.run_id, TAG_ERROR, "its process stopped without ending the run (killed?); "
                                                          "marked KILLED by the next run of this stage and shard")
        MlflowClient().set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


@contextmanager
def stage_run(config: Config, stage: str, digest: str, name: str | None = None, shard: Shard = Shard()):
    """The parent run of one stage invocation, named `name` (default: the stage), in the experiment
    the config names: every resolved config value as a param, git commit tag; on a GPU, MLflow's
    system metrics (GPU utilisation and memory, CPU, RAM) as `system/*`.

    Inside `mlflow run` the run it created is used when it is in that experiment; inside another
    active run (the `experiment` and `sweep` stages) the stage run is nested under it.
    """
    experiment_id = get_or_create_experiment(config.experiment)
    close_stale_stage_runs(experiment_id, stage, digest, shard)
    tags = _stage_tags(stage, digest, shard)
    launcher = _launcher_run(experiment_id)
    system_metrics = gpu_present()
    if launcher is not None:
        run = mlflow.start_run(run_id=launcher, log_system_metrics=system_metrics)
        mlflow.set_tags({**tags, "mlflow.runName": name or stage})
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name or stage, tags=tags,
                               nested=mlflow.active_run() is not None, log_system_metrics=system_metrics)
    with run:
        mlflow.log_params(config.flat())
        try:
            yield run
        except (KeyboardInterrupt, Preempted):
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        except Exception as exc:  # the run ends FAILED (mlflow's own doing) and says why
            mlflow.set_tag(TAG_ERROR, f"{type(exc).__name__}: {exc}"[:4000])
            raise


@contextmanager
def point_stage_run(config: Config, stage: str, digest: str, name: str, parent: Run, shard: Shard = Shard()):
    """The stage run of one more arm that the invocation of `parent` records (a step of
    adaptation.eval_at), nested under it: the same tags, its own params and digest; ended with the
    same status as `parent`."""
    client = MlflowClient()
    close_stale_stage_runs(parent.info.experiment_id, stage, digest, shard)
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags={**_stage_tags(stage, digest, shard), MLFLOW_PARENT_RUN_ID: parent.info.run_id})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in config.flat().items()])
    try:
        yield run
    except (KeyboardInterrupt, Preempted):
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except Exception as exc:
        client.set_tag(run.info.run_id, TAG_ERROR, f"{type(exc).__name__}: {exc}"[:4000])
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))


def log_arms_record(grid: dict[str, list[str]], metric: str, baseline_digest: str, arms: list[dict]) -> None:
    """On the active run: the arms of a sweep or of a step curve (each with its `arm` name, `digest`
    and grid `point`), which the viewer shows together, with evaluate's figures from each arm's stage run."""
    mlflow.log_dict({"grid": grid, "metric": metric, "baseline_digest": baseline_digest, "arms": arms}, ARMS_RECORD)
    mlflow.set_tag(TAG_ARMS_RECORD, "true")


def _stage_tags(stage: str, digest: str, shard: Shard) -> dict[str, str]:
    return {TAG_STAGE: stage, TAG_DIGEST: digest, TAG_SHARD: str(shard), TAG_KIND: "stage", "git_commit": git_commit()}


def finished_clips(experiment_id: str, stage: str, digest: str, inputs: dict[str, str] | None = None,
                   weights: str | None = None, status: str = "FINISHED") -> dict:
    """clip id -> the child run (mlflow Run) of this stage and digest with that status, keeping only
    runs made from the given inputs (clip id -> input hash) and weights fingerprint when given."""
    runs = search_all(experiment_id, f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_DIGEST}` = '{digest}' "
                                  f"and tags.`{TAG_KIND}` = 'clip' and attributes.status = '{status}'",
                      order_by=["attributes.start_time ASC"])  # the newest run of a clip wins
    return {r.data.tags[TAG_CLIP]: r for r in runs
            if (inputs is None or inputs.get(r.data.tags[TAG_CLIP]) == r.data.tags.get(TAG_INPUTS))
            and (weights is None or r.data.tags.get(TAG_WEIGHTS) == weights)}


def search_all(experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching the filter, page by page."""
    client, token, runs = MlflowClient(), None, []
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, order_by=order_by,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def frame_history(run_id: str, metric: str) -> dict[int, float]:
    """A clip run's per-frame values of a metric, by frame index."""
    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, f"{metric}_frame")}


def frame_curve(runs: list, metric: str) -> dict[str, list]:
    """Mean and SE of a per-frame metric over clip runs, by frame index."""
    histories = [h for h in (frame_history(r.info.run_id, metric) for r in runs) if h]
    if not histories:
        return {"frame": [], "mean": [], "se": []}
    frames = sorted(histories[0])
    mean, se = per_frame_curve([[h[f] for f in frames] for h in histories])
    return {"frame": frames, "mean": mean, "se": se}


def _close_stale_runs(experiment_id: str, stage: str, digest: str, clip_id: str) -> None:
    """Child runs of this clip left RUNNING by a process that died (kill -9, preemption)."""
    stale = search_all(experiment_id, f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_DIGEST}` = '{digest}' "
                                   f"and tags.`{TAG_CLIP}` = '{clip_id}' and attributes.status = 'RUNNING'")
    for run in stale:
        MlflowClient().set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


def start_clip_run(experiment_id: str, parent_run_id: str, stage: str, digest: str, clip_id: str,
                   tags: dict[str, str]) -> str:
    """A child run of the stage run for one clip (with its class, source, inputs and weights among
    `tags`); returns its id. Ended with `end_clip_run` once the clip is recorded (in the background,
    possibly after the next clip has started)."""
    _close_stale_runs(experiment_id, stage, digest, clip_id)
    tags = {**tags, TAG_STAGE: stage, TAG_DIGEST: digest, TAG_CLIP: clip_id, TAG_KIND: "clip",
            "git_commit": git_commit(), MLFLOW_PARENT_RUN_ID: parent_run_id}
    return MlflowClient().create_run(experiment_id, tags=tags, run_name=clip_id).info.run_id


def end_clip_run(run_id: str, error: BaseException | None = None) -> None:
    """FINISHED, or FAILED (KILLED when the stage was stopped) with the reason as a tag."""
    client = MlflowClient()
    if error is None:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        return
    client.set_tag(run_id, TAG_ERROR, str(error)[:4000])
    stopped = isinstance(error, (KeyboardInterrupt, Preempted))
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED if stopped else RunStatus.FAILED))
