"""Methods that leave every weight frozen and choose the noise the clip's samples start from, judged
by a proxy task on the context alone (docs/protocol.md, "Noise methods").

The proxy: the model continues context latent frames [0, Kc - m) to Kc and its last m frames are
compared (mean squared error, in latent space) with the context's own frames [Kc - m, Kc). The m
generated proxy frames start from the same noise as the first m frames the real continuation
generates ([Kc, Kc + m)), so a noise that continues the context's own motion well is the one kept.
No pixel after frame K is read: with `adaptation.data=other` the proxy is another clip's context
(the sham control), as for weight methods.

`select` draws `adaptation.candidates` noises per sample (the first is the sample's own, so one
candidate is the baseline) and keeps the one with the lowest proxy error; `noise` starts from the
sample's own noise and takes `adaptation.steps` Adam steps at `adaptation.lr` on its first m frames,
back-propagating the proxy error through the sampler (`adaptation.proxy_steps` steps), rescaled after
each step to the norm it started with so it stays as far from zero as a Gaussian draw.
"""
from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Collection, Sequence

import torch

from ..config import AdaptationConfig
from ..models.base import VideoBackend
from ..seeds import derive_seed
from .base import Adapter
from .trainer import Visit, synchronize


class ProxyNoiseMethod(Adapter):
    """The proxy task both noise methods score noises on; `fit` leaves the chosen noise in `noise`."""

    def __init__(self, backend: VideoBackend, config: AdaptationConfig):
        if not backend.takes_noise:
            raise ValueError(f"adaptation.method={config.method} chooses the sampler's starting noise, which "
                             f"{type(backend).__name__} does not take; use model.backend=ltx-video")
        self.backend, self.config = backend, config
        self.noise: torch.Tensor | None = None

    def reset(self) -> None:
        self.noise = None

    def sampling_noise(self) -> torch.Tensor | None:
        return self.noise

    def fit(self, window: torch.Tensor, seed: int, latent_frames: int, sample_seeds: Sequence[int],
            at: Collection[int] = (), visit: Visit | None = None) -> dict[str, float]:
        context_frames, m = window.shape[2], self.config.proxy_frames
        if not 0 < m < context_frames or context_frames + m > latent_frames:
            raise ValueError(f"adaptation.proxy_frames={m}: the proxy continues the context's first "
                             f"{context_frames} - {m} latent frames, so it needs 0 < m < {context_frames} and at most "
                             f"{latent_frames - context_frames} (the latent frames the continuation generates)")
        start, visited = time.perf_counter(), 0.0  # seconds spent in visits, which are not the adaptation's
        target = self.backend.latents_from(window, torch.Generator(self.backend.device).manual_seed(seed))
        own = self.backend.draw_noise(window.expand(len(sample_seeds), *window.shape[1:]), latent_frames, sample_seeds)
        context, target = window[:, :, : context_frames - m], target[:, :, context_frames - m:]

        def at_step(steps: int, noise: torch.Tensor, first: float | None) -> None:
            """A visit with the noise a fit of `steps` steps ends in, and that fit's figures."""
            nonlocal visited
            if visit is None:
                return
            synchronize(self.backend.device)
            entered = time.perf_counter()
            self.noise = noise
            last = float(self.proxy_error(context, target, noise, sample_seeds).mean())  # as such a fit ends
            synchronize(self.backend.device)
            visit(steps, {"adapt_seconds": time.perf_counter() - start - visited,
                          "proxy_error_first": last if first is None else first, "proxy_error_last": last})
            visited += time.perf_counter() - entered

        self.noise, first, last = self.choose(context, target, own, sample_seeds, at, at_step)
        synchronize(self.backend.device)
        return {"adapt_seconds": time.perf_counter() - start - visited, "proxy_error_first": first,
                "proxy_error_last": last}

    @abstractmethod
    def choose(self, context: torch.Tensor, target: torch.Tensor, own: torch.Tensor, sample_seeds: Sequence[int],
               at: Collection[int], at_step: Callable[[int, torch.Tensor, float | None], None]
               ) -> tuple[torch.Tensor, float, float]:
        """The noise each sample starts from (shaped like `own`, the samples' own draws), and the
        mean proxy error of the samples' own noise and of the chosen one. A method that takes steps
        calls `at_step(steps, noise so far, first error)` after each step count in `at`."""

    def proxy_error(self, context: torch.Tensor, target: torch.Tensor, noise: torch.Tensor, seeds: Sequence[int],
                    grad: bool = False) -> torch.Tensor:
        """Per noise in `noise` (continuation-shaped), the proxy's mean squared error against `target`."""
        m = target.shape[2]
        kept = context.shape[2]
        proxy_noise = torch.cat([noise[:, :, :kept], noise[:, :, kept + m: kept + 2 * m]], dim=2)
        out = self.backend.sample_batch(context.expand(len(noise), *context.shape[1:]), kept + m, seeds,
                                        noise=proxy_noise, steps=self.config.proxy_steps or None, grad=grad)
        return (out[:, :, kept:] - target).pow(2).flatten(1).mean(1)


class NoiseSelection(ProxyNoiseMethod):
    """Best of `adaptation.candidates` noises per sample: the cheap control for weight updates."""

    @classmethod
    def names(cls, config: AdaptationConfig) -> tuple[str, str]:
        return f"select best of {config.candidates} noises", f"select-n{config.candidates}"

    def choose(self, context, target, own, sample_seeds, at, at_step):  # no steps: config refuses eval_at
        chosen, first, best = [], [], []
        for n, seed in enumerate(sample_seeds):
            others = [derive_seed(seed, "select", c) for c in range(1, self.config.candidates)]
            candidates = torch.cat([own[n:n + 1], self.backend.draw_noise(own[:1].expand(len(others), *own.shape[1:]),
                                                                          own.shape[2], others)]) if others else own[n:n + 1]
            errors = self.proxy_error(context, target, candidates, [seed] * len(candidates))
            chosen.append(candidates[int(errors.argmin())])
            first.append(float(errors[0]))
            best.append(float(errors.min()))
        return torch.stack(chosen), float(sum(first) / len(first)), float(sum(best) / len(best))


class NoiseOptimisation(ProxyNoiseMethod):
    """The samples' own noise, its first m generated frames optimised on the proxy."""

    @classmethod
    def names(cls, config: AdaptationConfig) -> tuple[str, str]:
        return f"noise optimisation {config.steps} steps", f"noise-lr{config.lr:g}-{config.steps}steps"

    def choose(self, context, target, own, sample_seeds, at, at_step):
        kept, m = context.shape[2], target.shape[2]
        begin = kept + m  # the first generated frame of the continuation: context_frames
        optimised = own[:, :, begin: begin + m].clone().requires_grad_(True)
        norm = optimised.detach().flatten(1).norm(dim=1)
        optimizer = torch.optim.Adam([optimised], lr=self.config.lr)
        first = None
        if 0 in at:
            at_step(0, torch.cat([own[:, :, :begin], optimised.detach(), own[:, :, begin + m:]], dim=2), first)
        for step in range(self.config.steps):
            noise = torch.cat([own[:, :, :begin], optimised, own[:, :, begin + m:]], dim=2)
            error = self.proxy_error(context, target, noise, sample_seeds, grad=True)
            first = float(error.detach().mean()) if first is None else first
            optimizer.zero_grad()
            error.sum().backward()
            optimizer.step()
            with torch.no_grad():
                optimised.mul_((norm / optimised.flatten(1).norm(dim=1)).view(-1, 1, 1, 1, 1))
                if not torch.isfinite(optimised).all():
                    raise FloatingPointError(f"noise optimisation: the noise became non-finite at step {step + 1}; "
                                             "lower adaptation.lr")
            if step + 1 in at:
                at_step(step + 1, torch.cat([own[:, :, :begin], optimised.detach(), own[:, :, begin + m:]], dim=2),
                        first)
        noise = torch.cat([own[:, :, :begin], optimised.detach(), own[:, :, begin + m:]], dim=2)
        last = float(self.proxy_error(context, target, noise, sample_seeds).mean())
        return noise, last if first is None else first, last
