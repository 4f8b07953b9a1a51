"""Running stages as SLURM job-array tasks: shards, preemption signals, a store safe for many writers,
and the sbatch script each task runs."""
from __future__ import annotations

import os
import signal
import string
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "stage.sbatch"
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the task stopped early and wants to be requeued


class Preempted(BaseException):
    """Raised inside the running clip when SLURM asks the task to stop (SIGTERM or SIGUSR1)."""


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'I/N', or '' for SLURM's array task id and count (a whole run outside an array)."""
        if not text:
            env = os.environ
            if "SLURM_ARRAY_TASK_ID" in env:
                first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                return cls(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env.get("SLURM_ARRAY_TASK_COUNT", "1")))
            return cls()
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected INDEX/COUNT such as 0/4") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard {text!r}: the index must be in [0, {count})")
        return cls(index, count)

    def select(self, items: list) -> list:
        return items[self.index :: self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def check_store_for_many_writers(shard: Shard) -> None:
    """Refuse a SQLite file when several tasks would write to it at once."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if (shard.count > 1 or "SLURM_ARRAY_JOB_ID" in os.environ) and uri.startswith("sqlite"):
        raise RuntimeError(
            f"MLFLOW_TRACKING_URI={uri} is a SQLite file, which is not safe for many concurrent writers (least of "
            "all on a shared network filesystem). Start an `mlflow server` (PostgreSQL backend on a cluster) and "
            "point MLFLOW_TRACKING_URI at it: see README, 'Running on a SLURM cluster'.")


@contextmanager
def preemptible():
    """SIGTERM/SIGUSR1 raise Preempted in the main thread, so the current clip is abandoned, marked
    KILLED, and the task exits for a requeue."""

    def handler(signum, frame):
        for s in previous:  # one stop is enough: SLURM may signal the task and its shell both
            signal.signal(s, signal.SIG_IGN)
        raise Preempted(f"preempted by {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass(frozen=True)
class Resources:
    """What each task of a job asks SLURM for, and where it writes."""

    partition: str = ""
    gpus: int = 1
    cpus: int = 8
    mem: str = "64G"
    time: str = "04:00:00"
    scratch: str = "/tmp"
    log_dir: str = "slurm/logs"


def render_sbatch(command: str, tasks: int, tracking_uri: str, job_name: str, resources: Resources) -> str:
    """The sbatch script that runs `python -m pipeline <command>`: a job array of `tasks` tasks (each
    sees its index as SLURM_ARRAY_TASK_ID), or a single job when `tasks` is 0."""
    r = resources
    return string.Template(TEMPLATE.read_text()).substitute(
        command=command, array_line=f"#SBATCH --array=0-{tasks - 1}" if tasks else "",
        log_name="%x-%A_%a.out" if tasks else "%x-%j.out", tracking_uri=tracking_uri,
        job_name=job_name, partition_line=f"#SBATCH --partition={r.partition}" if r.partition else "",
        gpus=r.gpus, cpus=r.cpus, mem=r.mem, time=r.time, scratch=r.scratch, log_dir=str(Path(r.log_dir).resolve()),
        repo=str(TEMPLATE.parents[1]), exit_preempted=PREEMPTED_EXIT_CODE)


def write_sbatch(script: str, job_name: str, resources: Resources) -> Path:
    """slurm/rendered/<job_name>.sbatch (and the log folder its tasks write to)."""
    Path(resources.log_dir).mkdir(parents=True, exist_ok=True)
    path = TEMPLATE.parent / "rendered" / f"{job_name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    return path


def sbatch(path: Path, after: str = "") -> str:
    """Submit a script (once job `after` has ended, however it ended, when given); returns the job id."""
    dependency = [f"--dependency=afterany:{after}"] if after else []
    out = subprocess.run(["sbatch", "--parsable", *dependency, str(path)], check=True, capture_output=True, text=True)
    return out.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
