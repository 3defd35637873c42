"""The repository's benchmark scripts and recorded results (``RESULTS.md``, ``results/``); not installed.

The suite itself is part of the package (:mod:`medseg_jax.bench`): ``medseg-jax benchmark --help``, or
``python -m benchmarks --help`` from a clone. The scripts here run as files, e.g.
``python benchmarks/bench_augment.py --help``.
"""
