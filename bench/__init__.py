"""Benchmarks and the torch reference implementation the JAX methods are measured against."""
