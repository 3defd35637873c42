"""Several networks of one architecture, each with its own parameters, whose logits are averaged.

This is how nnU-Net ensembles the folds of a trained model: its predictor sums each fold's logits
(each already blended over sliding windows and mirrored copies) and divides by the number of folds.
Those averages are all linear, so averaging the folds' logits inside every window call -- what
:class:`Ensemble` does -- gives exactly the same result, and the whole ensemble runs through medseg-jax's
sliding window as one network. Pure like every model here: ``params = Ensemble(...).init(key, x)``.
"""

from __future__ import annotations

import flax.linen as nn


class Ensemble(nn.Module):
    """The mean of ``members`` copies of ``network`` (parameters ``member_0`` ... ``member_{n-1}``).

    Deep-supervision outputs (a list per member) are averaged level by level.
    """

    network: nn.Module
    members: int

    @nn.compact
    def __call__(self, x):
        if self.members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {self.members}")
        outputs = [self.network.copy(name=f"member_{i}")(x) for i in range(self.members)]
        if isinstance(outputs[0], (list, tuple)):
            return [sum(level) / self.members for level in zip(*outputs)]
        return sum(outputs) / self.members

    def total_stride(self) -> tuple[int, ...]:
        """The factor every input axis must be divisible by (the member network's)."""
        return self.network.total_stride()
