"""The preprocess stage as an MLflow run: clips, manifest, the list of skipped videos, and the
resolved config beside the manifest, so later stages take the dataset without repeating flags."""
from __future__ import annotations

from pathlib import Path

import mlflow
import yaml

from ..config import Config
from ..data.preprocess import preprocess
from ..tracking.runs import stage_run


def run_preprocess(config: Config):
    with stage_run(config, "preprocess", config.digest("data")):
        manifest, records, skipped = preprocess(config.data)
        splits = {s: sum(r.split == s for r in records) for s in ("train", "test")}
        mlflow.log_metrics({"clips_kept": len(records), "videos_skipped": len(skipped),
                            **{f"clips_{s}": n for s, n in splits.items()}})
        mlflow.log_artifact(str(manifest))
        mlflow.log_artifact(str(manifest.with_name("skipped.csv")))
    settings = Path(config.data.output_dir) / "config.yaml"
    settings.write_text(yaml.safe_dump(config.sections(), sort_keys=False))
    print(f"[preprocess] {manifest}: {len(records)} clips ({splits}), {len(skipped)} videos skipped; "
          f"next: python -m pipeline experiment --config {settings}", flush=True)
    return manifest
