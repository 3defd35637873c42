"""Training: state, optimisers, pure train / eval steps."""

from medseg_jax.train.optim import make_lr_schedule, make_optimizer  # noqa: F401
from medseg_jax.train.state import TrainState, create_train_state  # noqa: F401
from medseg_jax.train.step import make_eval_step, make_train_step  # noqa: F401
