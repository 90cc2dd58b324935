"""Helpers to run Ray Serve LLM without a GPU (demo, tests, benchmarks). Not for production."""
