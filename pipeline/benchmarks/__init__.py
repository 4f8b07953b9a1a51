"""GPU benchmarks at real size with random weights: LTX-Video (ltx_video) and Open-Sora (opensora); `python -m pipeline bench` and `bench-opensora`."""
