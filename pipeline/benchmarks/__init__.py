"""GPU benchmarks at real size with random weights: LTX-Video (ltx_video; `python -m pipeline bench`), Open-Sora and
SkyReels-V2 (released_size; `python -m pipeline bench-backend`)."""
