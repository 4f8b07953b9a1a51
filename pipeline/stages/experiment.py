"""A whole experiment in one command: every stage a child run of one experiment run."""
from __future__ import annotations

from ..config import Config
from ..tracking.runs import stage_run
from .continuation import run_stage
from .evaluate import evaluate
from .preprocess import run_preprocess
from .pretrain import pretrain


def run_experiment(config: Config) -> dict:
    with stage_run(config, "experiment", config.digest("data", "model", "sampling", "adaptation", "evaluation")):
        run_preprocess(config)
        if not config.model.pretrained:
            pretrain(config)
        run_stage(config, "baseline")
        run_stage(config, "adapt")
        return evaluate(config)
