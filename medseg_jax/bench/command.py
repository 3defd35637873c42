"""The suite's command line, defined once: ``medseg-jax benchmark`` (a subcommand of
:mod:`medseg_jax.cli`) and ``python -m benchmarks`` (the shim in a clone's ``benchmarks/`` folder) both
take these flags and run :func:`run`.

Importing this module is cheap (argparse only): the suite and JAX load when a run starts, so that
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from medseg_jax.errors import MedsegError

# The suite's vocabulary lives here, beside the flags, so that building the parser imports no JAX
# (the suite imports OPERATIONS from here; a test checks PRESETS names medseg_jax.bench.cases.PRESETS).
PRESETS = ("smoke", "nnunet")
OPERATIONS = ("conv", "upsample", "conv_block", "unet_forward", "train_step", "inference", "sliding_window", "layers")
VARIANTS = ("all", "fast")  # = medseg_jax.bench.cases.VARIANT_SETS
DESCRIPTION = (
    "Time convolutions, upsampling, the conv block, the U-Net forward pass, the training step, "
    "3D inference windows and sliding-window inference, every implementation side by side (and "
    "PyTorch's nnU-Net where installed); print a Markdown table and write JSON + Markdown files."
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the suite's flags to ``parser`` (a subparser or a stand-alone parser) and return it."""
    parser.add_argument(
        "--preset",
        default="smoke",
        choices=PRESETS,
        help="smoke: toy shapes, seconds (what CI runs); nnunet: nnU-Net's default 2D 256^2 and "
        "3D 64^3 networks, batch 2 (default: smoke)",
    )
    parser.add_argument(
        "--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3], metavar="DIM", help="2 and/or 3 (default: 2 3)"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        metavar="DTYPE",
        help="float32 and/or bfloat16 (default: float32)",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        default=list(OPERATIONS),
        choices=list(OPERATIONS),
        metavar="OP",
        help=f"which groups to measure, of {', '.join(OPERATIONS)} (default: all)",
    )
    parser.add_argument(
        "--runs", type=positive_int, default=None, help="timed calls per member (default: 2 for smoke, 3 for nnunet)"
    )
    parser.add_argument(
        "--out",
        default="benchmark-results",
        help="folder for the JSON and Markdown files (default: ./benchmark-results)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch nnU-Net baseline")
    parser.add_argument(
        "--variants",
        default="all",
        choices=VARIANTS,
        help="network variants in the U-Net groups: all formulations, or fast = the default and its "
        "XLA-only fallback (against PyTorch where installed) (default: all)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the suite with parsed flags: progress lines on stderr, the Markdown table on stdout."""
    from medseg_jax.bench.report import markdown_report
    from medseg_jax.bench.suite import run_benchmarks

    report = run_benchmarks(
        args.preset,
        dims=args.dims,
        dtypes=args.dtypes,
        operations=args.ops,
        runs=args.runs,
        out_dir=args.out,
        torch=not args.no_torch,
        variants=args.variants,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(markdown_report(report))
    print("wrote " + ", ".join(report.get("files", [])), file=sys.stderr)
    return 0


def main(argv=None, prog: str = "python -m medseg_jax.bench") -> int:
    """Stand-alone entry point; a library error becomes one ``error:`` line and exit status 2, as in
    ``medseg-jax``."""
    args = add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION)).parse_args(argv)
    try:
        return run(args)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
