"""The data pipeline: IO, datasets, fingerprint and plan, preprocessing, store, loader, synthetic data.

This sub-package is numpy/scipy only: it never imports JAX, so worker processes stay light.
"""
