"""Running and fine-tuning models trained with nnU-Net v2 (no torch needed).

- :mod:`~medseg_jax.nnunet.pth`: ``.pth`` checkpoints read with a restricted unpickler (tensors become
  numpy arrays; any other global is refused, so a checkpoint cannot run code);
- :mod:`~medseg_jax.nnunet.architecture`: the network of a ``plans.json`` configuration (PlainConvUNet,
  ResidualEncoderUNet; old and new plans styles) as medseg-jax U-Net settings;
- :mod:`~medseg_jax.nnunet.convert`: the state dict -> Flax parameters, tensor by tensor;
- :mod:`~medseg_jax.nnunet.preprocessing`: nnU-Net's preprocessing (axis order, crop, normalisation,
  resampling) as a medseg-jax plan;
- :mod:`~medseg_jax.nnunet.importer`: ``medseg-jax import-nnunet``, a model folder -> a run folder.
"""

from medseg_jax.nnunet.pth import load_pth  # noqa: F401  (public API)
