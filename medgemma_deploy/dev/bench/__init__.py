"""Benchmarks (not tests): ``python -m medgemma_deploy.dev.bench.worker_bench``."""
