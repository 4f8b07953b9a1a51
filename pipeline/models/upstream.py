"""Access to the upstream `opensora` package (github.com/hpcaitech/Open-Sora), which is not on PyPI.

v1.3 and v2.0 live on different branches of one repository and both install as `opensora`, so
each needs its own environment; docs/opensora.md gives the install and checkpoint steps.
"""
from __future__ import annotations

import importlib

INSTALL = {
    "v1.3": "git clone -b opensora/v1.3 https://github.com/hpcaitech/Open-Sora open-sora-v1.3 && "
            "pip install --no-deps -e open-sora-v1.3 && pip install xformers==0.0.35 --no-deps && "
            "pip install timm einops mmengine",
    "v2.0": "git clone https://github.com/hpcaitech/Open-Sora open-sora-v2.0 && "
            "pip install --no-deps -e open-sora-v2.0 && pip install einops mmengine omegaconf",
}
# a module that exists on one branch only tells the two apart
MARKER = {"v1.3": "opensora.models.stdit.stdit3", "v2.0": "opensora.models.mmdit.model"}


class OpenSoraMissing(ImportError):
    pass


def require_opensora(version: str):
    """Import the upstream module that marks `version`, or explain how to install it."""
    try:
        return importlib.import_module(MARKER[version])
    except ImportError as exc:
        raise OpenSoraMissing(
            f"model.backend=opensora-{version} needs the upstream Open-Sora {version} package "
            f"(importing {MARKER[version]} failed: {exc}). Install it into this environment with:\n"
            f"  {INSTALL[version]}\nsee docs/opensora.md for checkpoints and offline compute nodes"
        ) from exc
