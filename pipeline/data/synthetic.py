"""Synthetic clips: shapes moving over textured backgrounds, a few motion classes, real mp4 files.

Every clip has its own background texture, shape, colour, size, speed and direction, so a model
pretrained on the train split still has something to learn from a test clip's context frames.
"""
from __future__ import annotations

import numpy as np

MOTION_CLASSES = ("bounce", "orbit", "rotate", "scale")
SUPERSAMPLE = 4  # render at 4x and average down for anti-aliased edges


def render_clip(label: str, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class `label` as (T, H, W, 3) uint8."""
    if label not in MOTION_CLASSES:
        raise ValueError(f"unknown motion class {label!r}; choose from {MOTION_CLASSES}")
    h, w = height * SUPERSAMPLE, width * SUPERSAMPLE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / SUPERSAMPLE
    background = _texture(yy, xx, rng)
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    # a turning disc would look still: rotating clips turn a square or a triangle
    shape = rng.choice(["square", "triangle"] if label == "rotate" else ["disc", "square", "triangle"])
    size = rng.uniform(0.12, 0.22) * min(height, width)
    path = _motion(label, frames, height, width, size, rng)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t, (cy, cx, scale, angle) in enumerate(path):
        mask = _shape_mask(shape, yy - cy, xx - cx, size * scale, angle)[..., None]
        image = background * (1 - mask) + colour * mask
        out[t] = image.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE, 3).mean((1, 3)).round().astype(np.uint8)
    return out


def _texture(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth two-colour pattern of a few random plane waves."""
    base, other = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    field = np.zeros_like(yy)
    for _ in range(3):
        freq = rng.uniform(0.05, 0.3, 2)
        field += np.sin(freq[0] * yy + freq[1] * xx + rng.uniform(0, 2 * np.pi))
    mix = (field / 6 + 0.5)[..., None]
    return base * (1 - mix) + other * mix


def _motion(label: str, frames: int, height: int, width: int, size: float, rng: np.random.Generator):
    """Per frame (centre y, centre x, scale, angle)."""
    t = np.arange(frames, dtype=np.float32)
    cy0, cx0 = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    speed = rng.uniform(0.6, 1.6)
    direction = rng.uniform(0, 2 * np.pi)
    ones, zeros = np.ones_like(t), np.zeros_like(t)
    if label == "bounce":
        cy = _reflect(cy0 + speed * np.sin(direction) * t, size, height - size)
        cx = _reflect(cx0 + speed * np.cos(direction) * t, size, width - size)
        return zip(cy, cx, ones, zeros)
    if label == "orbit":
        radius = rng.uniform(0.15, 0.25) * min(height, width)
        phase = direction + np.sign(rng.uniform(-1, 1)) * speed * t / radius
        return zip(height / 2 + radius * np.sin(phase), width / 2 + radius * np.cos(phase), ones, zeros)
    if label == "rotate":
        angle = direction + np.sign(rng.uniform(-1, 1)) * speed * 0.15 * t
        return zip(cy0 * ones, cx0 * ones, 1.4 * ones, angle)
    scale = 1.0 + 0.5 * np.sin(direction + speed * 0.25 * t)
    return zip(cy0 * ones, cx0 * ones, scale, zeros)


def _reflect(x: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    folded = np.mod(x - low, 2 * span)
    return low + np.where(folded > span, 2 * span - folded, folded)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if shape == "disc":
        return (u**2 + v**2 <= radius**2).astype(np.float32)
    if shape == "square":
        return ((np.abs(u) <= radius * 0.85) & (np.abs(v) <= radius * 0.85)).astype(np.float32)
    # triangle pointing along u: inside three half-planes
    inside = (u >= -radius / 2) & (np.abs(v) <= (radius - u) / np.sqrt(3))
    return inside.astype(np.float32)
