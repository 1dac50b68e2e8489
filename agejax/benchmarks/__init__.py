"""Benchmarks: the JAX train step, the PyTorch baseline, loop/start-up/input, serving."""
