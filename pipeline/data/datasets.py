"""Official action-recognition datasets: where to get them, how they are laid out, their split lists.

Download and extraction run once, on a login node with internet:
    python -m pipeline download-dataset ucf101 --dest /data/ucf101
Both datasets ship as .rar archives; extraction uses `unar` (Debian/Ubuntu: apt-get install unar).
"""
from __future__ import annotations

import random
import shutil
import subprocess
import urllib.request
from collections import defaultdict
from pathlib import Path

SOURCES = {
    "ucf101": {
        "videos": "https://www.crcv.ucf.edu/data/UCF101/UCF101.rar",
        "splits": "https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip",
    },
    "hmdb51": {
        "videos": "http://serre-lab.clps.brown.edu/wp-content/uploads/2013/10/hmdb51_org.rar",
        "splits": "http://serre-lab.clps.brown.edu/wp-content/uploads/2013/10/test_train_splits.rar",
    },
}
# after extraction into DEST: the folder of class sub-folders, and the folder of split lists
LAYOUT = {"ucf101": ("UCF-101", "ucfTrainTestlist"), "hmdb51": ("videos", "testTrainMulti_7030_splits")}


def check_extractor() -> str:
    tool = shutil.which("unar")
    if tool is None:
        raise RuntimeError("extracting .rar archives needs `unar`, which is not installed: "
                           "`apt-get install unar` (Debian/Ubuntu) or `brew install unar`, then run this again")
    return tool


def download_dataset(name: str, dest: Path) -> Path:
    """Download and extract a dataset into dest; returns the folder to give as data.input_dir."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
    unar = check_extractor()  # before hours of downloading
    dest.mkdir(parents=True, exist_ok=True)
    videos_dir, splits_dir = (dest / d for d in LAYOUT[name])
    archives = {kind: _download(url, dest / url.rsplit("/", 1)[-1]) for kind, url in SOURCES[name].items()}
    if not splits_dir.exists():
        subprocess.run([unar, "-force-overwrite", "-o", str(dest), str(archives["splits"])], check=True)
    if not videos_dir.exists():
        if name == "hmdb51":  # one .rar per class inside the outer .rar
            inner = dest / "class_archives"
            subprocess.run([unar, "-force-overwrite", "-no-directory", "-o", str(inner), str(archives["videos"])],
                           check=True)
            for archive in sorted(inner.glob("*.rar")):
                subprocess.run([unar, "-force-overwrite", "-o", str(videos_dir), str(archive)], check=True)
        else:
            subprocess.run([unar, "-force-overwrite", "-o", str(dest), str(archives["videos"])], check=True)
    return videos_dir


def _download(url: str, path: Path) -> Path:
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    print(f"downloading {url} -> {path}", flush=True)
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    partial.replace(path)
    return path


def official_splits(name: str, splits_dir: Path, split_id: int) -> dict[str, str]:
    """'Class/video.avi' -> 'train' | 'test' from the official lists of split `split_id` (1-3).
    HMDB51 videos marked 0 (in neither part of the split) are left out."""
    if not splits_dir.is_dir():
        raise FileNotFoundError(f"data.splits_dir={splits_dir} is not a directory of {name} split lists")
    splits: dict[str, str] = {}
    if name == "ucf101":
        for part in ("train", "test"):
            path = splits_dir / f"{part}list0{split_id}.txt"
            for line in _lines(path):
                splits[line.split()[0]] = part
        return splits
    for path in sorted(splits_dir.glob(f"*_test_split{split_id}.txt")):
        label = path.name[: -len(f"_test_split{split_id}.txt")]
        for line in _lines(path):
            video, code = line.split()
            if code in ("1", "2"):
                splits[f"{label}/{video}"] = "train" if code == "1" else "test"
    if not splits:
        raise FileNotFoundError(f"{splits_dir} has no *_test_split{split_id}.txt lists")
    return splits


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"split list {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def stratified_sample(items: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """n of the (key, class) items, as evenly over classes as possible, chosen reproducibly."""
    if n <= 0 or n >= len(items):
        return items
    rng = random.Random(seed)
    by_class: dict[str, list] = defaultdict(list)
    for item in sorted(items):
        by_class[item[1]].append(item)
    for members in by_class.values():
        rng.shuffle(members)
    classes = sorted(by_class)
    rng.shuffle(classes)
    chosen = []
    while len(chosen) < n:
        for label in classes:
            if by_class[label] and len(chosen) < n:
                chosen.append(by_class[label].pop())
    return sorted(chosen)
