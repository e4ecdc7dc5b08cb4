"""Benchmarks and experiments: run from the repository root as ``python -m benchmarks.NAME`` (they use
jas_prune's public API only; nothing in the package imports them)."""
