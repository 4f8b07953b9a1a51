"""The clip manifest: one CSV row per clip, the contract between preprocessing and every later stage."""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ClipRecord:
    clip_id: str
    label: str  # the class
    path: str  # relative to the manifest's folder, or absolute
    frames: int
    fps: float
    height: int
    width: int
    split: str
    source: str  # the original video, or "synthetic"
    start_frame: int = 0
    content_hash: str = ""  # frames_hash of the decoded clip: results are keyed on it


def write_manifest(path: str | Path, records: list[ClipRecord]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(ClipRecord)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> list[ClipRecord]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist: make it with `python -m pipeline preprocess` "
                                f"and the same --config and --set (data.output_dir={path.parent})")
    casts = {fl.name: fl.type for fl in fields(ClipRecord)}
    records = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                values = {k: {"int": int, "float": float}.get(casts[k], str)(v) for k, v in row.items()}
                records.append(ClipRecord(**values))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {line}: bad manifest row ({exc})") from exc
    return records


def resolve_clip_path(manifest_path: str | Path, record: ClipRecord) -> Path:
    p = Path(record.path)
    return p if p.is_absolute() else Path(manifest_path).parent / p


def select_clips(records: list[ClipRecord], split: str, num_clips: int | None) -> list[ClipRecord]:
    """The first `num_clips` clips of a split, in manifest order (stable across reruns)."""
    chosen = [r for r in records if r.split == split]
    return chosen if not num_clips else chosen[:num_clips]
