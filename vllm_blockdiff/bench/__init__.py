"""Benchmarks that drive the served model through vLLM (accuracy vs speed)."""
