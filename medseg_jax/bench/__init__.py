"""medseg-jax's benchmark suite and model-level tuning, installed with the package.

- :mod:`.command`: the suite's flags and entry point (``medseg-jax benchmark``, ``python -m
  medseg_jax.bench``, and ``python -m benchmarks`` in a clone);
- :mod:`.suite`: :func:`~medseg_jax.bench.suite.run_benchmarks`, the library entry point;
- :mod:`.cases` (what is measured, FLOP convention), :mod:`.timing` (compile, warm-up, round-robin
  timing), :mod:`.report` (Markdown tables), :mod:`.torch_baseline` (optional PyTorch nnU-Net);
- :mod:`.model_tuning`: a model's layer shapes and the fastest implementations for them.

Nothing is imported here, so that ``medseg-jax benchmark --help`` stays instant. The repository's
``benchmarks/`` folder keeps the stand-alone scripts and the recorded results (``RESULTS.md``).
"""
