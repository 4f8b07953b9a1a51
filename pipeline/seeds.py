"""Seeds derived per clip (and per sample): the same in every arm, different between clips."""
from __future__ import annotations

import hashlib
import json


def derive_seed(base: int, *parts: str | int) -> int:
    """A 63-bit seed from a configured seed and what it is for, e.g. (sampling.seed, clip id, sample)."""
    digest = hashlib.sha256(json.dumps([base, *parts]).encode()).hexdigest()
    return int(digest[:16], 16) >> 1
