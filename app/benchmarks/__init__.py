"""Benchmarks: the engine's own ceiling, the service over HTTP, a naive baseline and a peer."""
