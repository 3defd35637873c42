"""medseg-jax's benchmark suite: ``python -m benchmarks --help`` (or ``medseg-jax benchmark``);
the library entry point is :func:`benchmarks.suite.run_benchmarks`. Recorded runs: ``RESULTS.md``."""
