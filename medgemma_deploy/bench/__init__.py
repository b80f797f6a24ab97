"""Benchmarks (not tests): ``python -m medgemma_deploy.bench.worker_bench``."""
