"""Reference implementations for tests and benchmarks (``graspext.testing.official``)."""
