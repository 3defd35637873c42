"""``python -m benchmarks``: run the suite and print the Markdown table (see :mod:`benchmarks.suite`)."""

from __future__ import annotations

import argparse
import sys

from benchmarks.report import markdown_report
from benchmarks.suite import OPERATIONS, run_benchmarks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--preset", default="smoke", choices=["smoke", "nnunet"])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--ops", nargs="+", default=list(OPERATIONS), choices=list(OPERATIONS))
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--out", default="benchmark-results", help="folder for the JSON and Markdown files")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args(argv)
    report = run_benchmarks(args.preset, dims=args.dims, dtypes=args.dtypes, operations=args.ops, runs=args.runs,
                            out_dir=args.out, torch=not args.no_torch,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown_report(report))
    print("wrote " + ", ".join(report.get("files", [])), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
