"""``python -m benchmarks`` (from a clone): the benchmark suite, which is installed with the package as
:mod:`medseg_jax.bench` (``medseg-jax benchmark`` takes the same flags)."""

import sys

from medseg_jax.bench.command import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks"))
