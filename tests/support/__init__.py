"""Helpers for the tests, the demo and the benchmarks, run from a checkout (never installed):
a real local Ray cluster driven as KubeRay drives it, and a Kubernetes-style Secret mount."""
