"""Data augmentation: nnU-Net v2's training transforms, on the device inside the jitted step
(:func:`make_augmentation`) or on the host (:func:`augment_numpy`), from one implementation for 2D
and 3D. See :mod:`medseg_jax.augment.pipeline` for the order and the sharding behaviour and
:mod:`medseg_jax.augment.spatial` for the coordinate convention and the crop margin."""

from medseg_jax.augment.config import AugmentConfig, check_augment_config  # noqa: F401
from medseg_jax.augment.pipeline import (  # noqa: F401
    augment_batch_numpy,
    augment_numpy,
    augment_sample,
    loader_crop_size,
    make_augmentation,
    train_step_augmentation,
)
from medseg_jax.augment.spatial import crop_size_for  # noqa: F401
