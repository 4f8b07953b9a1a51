"""A whole experiment in one command: every stage a child run of one experiment run, with the sham
control (the same adaptation on another clip's context) beside the adapted arm."""
from __future__ import annotations

from dataclasses import replace

from ..config import Config
from ..models import BACKENDS
from ..tracking.runs import stage_run
from .continuation import run_stage
from .evaluate import evaluate
from .preprocess import run_preprocess
from .pretrain import pretrain


def run_experiment(config: Config) -> dict:
    with stage_run(config, "experiment", config.digest("data", "model", "sampling", "adaptation", "evaluation")):
        run_preprocess(config)
        pretrainable = BACKENDS[config.model.backend].can_pretrain and not config.model.pretrained
        if pretrainable and config.pretrain.steps > 0:  # 0: model.weights used as they are
            config = config.with_setting("model.weights", str(pretrain(config)))
        run_stage(config, "baseline")
        run_stage(config, "adapt")
        if config.adaptation.data != "other":
            run_stage(replace(config, adaptation=replace(config.adaptation, data="other")), "adapt")
        return evaluate(config)
