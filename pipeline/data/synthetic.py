"""Synthetic clips whose future follows from their past: shapes that move by simple physics over
textured backgrounds.

Every clip moves, and no trivial predictor solves it: a shape at constant velocity, bouncing off the
walls, orbiting, falling and bouncing on the floor, passing in front of another shape, or a camera
panning over the textured world. Shape, colour, size, speed, direction, spin and background are drawn
per clip, so a model pretrained on the train clips still has something to learn from a test clip's
context. Rendered at 4x and averaged down, so edges move smoothly at sub-pixel speeds.
"""
from __future__ import annotations

import numpy as np

MOTION_CLASSES = ("velocity", "bounce", "orbit", "gravity", "occlusion", "pan")
SUPERSAMPLE = 4
# bumped whenever the same seed renders other pixels: pretrained weights record it (stages/pretrain.py)
GENERATOR_VERSION = 2


def synthetic_clip(config, index: int, split: str) -> tuple[str, str, np.ndarray]:
    """Clip `index` of a synthetic split (`config`: a DataConfig): (clip id, motion class, frames),
    the same on every machine."""
    label = MOTION_CLASSES[index % len(MOTION_CLASSES)]
    rng = np.random.default_rng([config.seed, split == "test", index])
    return f"{split}_{label}_{index:04d}", label, render_clip(label, config.frames, config.height, config.width, rng)


def render_clip(label: str, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class `label` as (T, H, W, 3) uint8."""
    if label not in MOTION_CLASSES:
        raise ValueError(f"unknown motion class {label!r}; choose from {MOTION_CLASSES}")
    scale = min(height, width)  # speeds, sizes and frequencies are drawn relative to the frame
    h, w = height * SUPERSAMPLE, width * SUPERSAMPLE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / SUPERSAMPLE + 0.5 / SUPERSAMPLE - 0.5
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    pan = np.zeros(2, np.float32)
    if label == "pan":
        angle = rng.uniform(0, 2 * np.pi)
        pan = rng.uniform(0.02, 0.045) * scale * np.array([np.sin(angle), np.cos(angle)], np.float32)
    # the camera moves by `pan` per frame: the world (background and shapes) moves by -pan in the frame
    image = _texture(yy[None] + pan[0] * t, xx[None] + pan[1] * t, scale, rng)
    if label == "occlusion":
        shapes = _crossing_pair(frames, height, width, scale, rng)
    else:
        shapes = [_shape(label, frames, height, width, scale, rng)]
    for kind, colour, size, (cy, cx, spin) in shapes:
        cy, cx = cy - pan[0] * t[:, 0, 0], cx - pan[1] * t[:, 0, 0]
        mask = _shape_mask(kind, yy[None] - cy[:, None, None], xx[None] - cx[:, None, None], size,
                           spin[:, None, None])[..., None]
        image = image * (1 - mask) + colour * mask
    out = image.reshape(frames, height, SUPERSAMPLE, width, SUPERSAMPLE, 3).mean((2, 4))
    return out.round().clip(0, 255).astype(np.uint8)


def _texture(yy: np.ndarray, xx: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Two colours mixed by a few random plane waves, coarse and fine, so that a pan is visible."""
    base, other = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    field = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), np.float32)
    for cycles in (rng.uniform(0.5, 1.5), rng.uniform(1.5, 3.0), rng.uniform(3.0, 5.0)):
        direction = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi * cycles / scale
        field += np.sin(k * (np.sin(direction) * yy + np.cos(direction) * xx) + rng.uniform(0, 2 * np.pi))
    mix = (field / 6 + 0.5)[..., None]
    return base * (1 - mix) + other * mix


def _shape(label: str, frames: int, height: int, width: int, scale: float, rng: np.random.Generator):
    kind = rng.choice(["disc", "square", "triangle"])
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    size = rng.uniform(0.1, 0.17) * scale
    return kind, colour, size, _path(label, frames, height, width, size, scale, rng)


def _path(label: str, frames: int, height: int, width: int, size: float, scale: float, rng: np.random.Generator):
    """Per frame (centre y, centre x, spin angle)."""
    t = np.arange(frames, dtype=np.float32)
    spin = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.12, 0.12) * t
    direction = rng.uniform(0, 2 * np.pi)
    dy, dx = np.sin(direction), np.cos(direction)
    if label in ("velocity", "pan"):
        # straight and steady, chosen so that the whole path stays in the frame
        speed = rng.uniform(0.02, 0.04) * scale
        travel = speed * (frames - 1)
        cy0 = _start(height, size, travel * dy, rng)
        cx0 = _start(width, size, travel * dx, rng)
        return cy0 + speed * dy * t, cx0 + speed * dx * t, spin
    if label == "bounce":
        speed = rng.uniform(0.04, 0.07) * scale
        cy0, cx0 = rng.uniform(size, height - size), rng.uniform(size, width - size)
        return (_reflect(cy0 + speed * dy * t, size, height - size),
                _reflect(cx0 + speed * dx * t, size, width - size), spin)
    if label == "orbit":
        radius = rng.uniform(0.2, 0.3) * scale
        omega = rng.choice([-1, 1]) * rng.uniform(0.03, 0.06) * scale / radius
        cy0, cx0 = height / 2 + rng.uniform(-0.05, 0.05) * scale, width / 2 + rng.uniform(-0.05, 0.05) * scale
        phase = direction + omega * t
        return cy0 + radius * np.sin(phase), cx0 + radius * np.cos(phase), spin
    if label == "gravity":
        # a ball thrown sideways: falls with constant acceleration and bounces on the floor
        floor, g = height - size, rng.uniform(0.006, 0.012) * scale
        vx = rng.choice([-1, 1]) * rng.uniform(0.015, 0.035) * scale
        return (_fall(rng.uniform(size, 0.6 * height), rng.uniform(-0.02, 0.02) * scale, g, floor, frames),
                _reflect(rng.uniform(size, width - size) + vx * t, size, width - size), spin)
    raise ValueError(f"no single-shape path for {label!r}")


def _crossing_pair(frames: int, height: int, width: int, scale: float, rng: np.random.Generator):
    """Two shapes on paths that cross mid-clip; the second is drawn over (occludes) the first."""
    t = np.arange(frames, dtype=np.float32)
    meet = np.array([rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width], np.float32)
    at = rng.uniform(0.35, 0.65) * (frames - 1)
    shapes = []
    for layer in range(2):
        kind, colour = rng.choice(["disc", "square", "triangle"]), rng.uniform(0, 255, 3).astype(np.float32)
        size = rng.uniform(0.14, 0.2) * scale if layer == 0 else rng.uniform(0.1, 0.15) * scale
        direction = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.01, 0.025) * scale if layer == 0 else rng.uniform(0.035, 0.06) * scale
        cy = meet[0] + speed * np.sin(direction) * (t - at)
        cx = meet[1] + speed * np.cos(direction) * (t - at)
        spin = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.12, 0.12) * t
        shapes.append((kind, colour, size, (cy, cx, spin)))
    return shapes


def _start(extent: float, size: float, travel: float, rng: np.random.Generator) -> float:
    low, high = size - min(travel, 0), extent - size - max(travel, 0)
    return rng.uniform(low, high) if high > low else (extent - travel) / 2


def _fall(y0: float, vy0: float, g: float, floor: float, frames: int) -> np.ndarray:
    """Heights of a ball under gravity `g` (down is +y) with elastic bounces on `floor`, per frame."""
    ys, y, vy = [], y0, vy0
    substeps = 16
    for _ in range(frames):
        ys.append(y)
        for _ in range(substeps):
            vy += g / substeps
            y += vy / substeps
            if y > floor:
                y, vy = 2 * floor - y, -abs(vy)
    return np.array(ys, np.float32)


def _reflect(x: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    folded = np.mod(x - low, 2 * span)
    return low + np.where(folded > span, 2 * span - folded, folded)


def _shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, radius: float, angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "disc":
        return (u**2 + v**2 <= radius**2).astype(np.float32)
    if kind == "square":
        return ((np.abs(u) <= radius * 0.85) & (np.abs(v) <= radius * 0.85)).astype(np.float32)
    # triangle pointing along u: inside three half-planes
    inside = (u >= -radius / 2) & (np.abs(v) <= (radius - u) / np.sqrt(3))
    return inside.astype(np.float32)
