"""The pretrained networks some metrics need: downloaded once by `python -m pipeline fetch-weights`
into the torch hub cache (`TORCH_HOME`), checksum-verified on every load. A metric whose weights are
absent is reported as unavailable with that command; a random network is never used for a reported
value.

torchvision's files carry the first hex digits of their sha256 in their names (torch hub's
convention), which download and load both check. StyleGAN-V's I3D has no published checksum: its
sha256 is recorded beside it when fetch-weights downloads it, and later loads are checked against
that record.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

FETCH_COMMAND = "python -m pipeline fetch-weights"


class WeightsUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Weights:
    name: str
    network: str  # what it is, in words
    file: str
    url: str
    sha256_prefix: str  # "": none published, the fetch records the full digest beside the file

    @property
    def path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file

    @property
    def record(self) -> Path:
        return self.path.with_name(self.path.name + ".sha256")

    def fetch(self) -> Path:
        """Download (unless a verified copy is there already) and, without a published checksum, record it."""
        try:
            return self.verified()
        except WeightsUnavailable:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(self.url, str(self.path), hash_prefix=self.sha256_prefix or None)
        if not self.sha256_prefix:
            self.record.write_text(sha256(self.path) + "\n")
        return self.path

    def verified(self, metric: str = "") -> Path:
        """The file, or WeightsUnavailable (one line: what is wrong and the command that fixes it)."""
        what = f"{metric} unavailable: " if metric else ""
        fix = f"Fetch them once on a machine with internet: `{FETCH_COMMAND}` (set TORCH_HOME to share them)."
        if not self.path.exists():
            raise WeightsUnavailable(f"{what}{self.network} weights not found at {self.path}. {fix}")
        if self.sha256_prefix:
            expected = self.sha256_prefix
        elif self.record.exists():
            expected = self.record.read_text().strip()
        else:
            raise WeightsUnavailable(f"{what}{self.path} has no checksum record {self.record.name} (not fetched by "
                                     f"`{FETCH_COMMAND}`). {fix}")
        actual = sha256(self.path)
        if not actual.startswith(expected):
            raise WeightsUnavailable(f"{what}{self.path} does not match its checksum (sha256 {actual[:16]}..., "
                                     f"expected {expected[:16]}...). {fix}")
        return self.path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


WEIGHTS = {w.name: w for w in (
    Weights("alexnet", "AlexNet (torchvision ImageNet, the LPIPS backbone)", "alexnet-owt-7be5be79.pth",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"),
    Weights("raft_small", "RAFT-small optical flow (torchvision Raft_Small_Weights.C_T_V2)",
            "raft_small_C_T_V2-01064c6d.pth", "https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth",
            "01064c6d"),
    # StyleGAN-V's TorchScript port of the TF-Hub I3D (Kinetics-400) that the original FVD uses
    Weights("i3d", "I3D (StyleGAN-V's TorchScript port, Kinetics-400)", "i3d_torchscript.pt",
            "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1", ""),
)}


def required(metric: str, needs: tuple[str, ...]) -> dict[str, Path]:
    """The verified files of every network `metric` needs, or WeightsUnavailable naming the first missing."""
    return {name: WEIGHTS[name].verified(metric) for name in needs}


def fetch_all() -> dict[str, Path]:
    return {name: w.fetch() for name, w in WEIGHTS.items()}
