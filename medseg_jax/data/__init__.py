"""The data pipeline: IO, datasets, fingerprint and plan, preprocessing, store, loader, synthetic data.

Modules, lowest first (each imports only those above it): ``volume`` (Volume, RAS reorientation),
``dicom`` (one DICOM series), ``image_io`` (NIfTI, read_image, read_case), ``case_files`` (cases in a
folder by file name), ``splits``, ``dataset`` (dataset.json, validation), ``resample``, ``intensity``,
``plan`` (plan rules and plan files), ``preprocess`` (crop, resample, normalise; and its inverse),
``fingerprint``, ``kvstore`` (where a store's bytes live), ``case_content`` (what one case is), ``store``
(CaseStore), ``loader``, ``synthetic``.

This sub-package is numpy/scipy only: it never imports JAX, so worker processes stay light.
"""
