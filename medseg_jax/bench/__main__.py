"""``python -m medseg_jax.bench``: the benchmark suite (see :mod:`medseg_jax.bench.command`)."""

import sys

from medseg_jax.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
