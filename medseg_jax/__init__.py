"""medseg-jax: medical image segmentation in JAX.

The model is importable on its own (``from medseg_jax.models import UNet``); this top-level module
stays light and imports nothing heavy, so that importing the model does not pull in training, data
or CLI code.
"""

__version__ = "0.1.0"

from medseg_jax.errors import (  # noqa: F401  (re-exported public API)
    CheckpointError,
    ConfigError,
    DataError,
    DatasetValidationError,
    MedsegError,
    TrainingError,
)
