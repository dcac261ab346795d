"""Redraws the plot of a `fuser-moe bench` run from its JSON, and reprints its tables.

    python -m benchmarks.plot benchmarks/results/h200x4/bench.json            # writes bench.png beside it
    python -m benchmarks.plot RESULTS.json -o OTHER.png --no-table

The same as `fuser-moe bench --plot-from RESULTS.json`; the drawing lives in fuser_moe/bench_report.py
so that the installed command line has it too. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import os
import sys

from fuser_moe import bench_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="bench.json written by `fuser-moe bench`")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default: the JSON's name with .png)")
    parser.add_argument("--no-table", action="store_true", help="do not print the tables")
    args = parser.parse_args(argv)
    try:
        document = bench_report.load(args.results)
    except (OSError, ValueError) as exc:
        print(f"benchmarks.plot: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    if not args.no_table:
        print(bench_report.format_report(document))
    message = bench_report.plot(document, args.output or os.path.splitext(args.results)[0] + ".png")
    print(f"benchmarks.plot: {message}", file=sys.stderr)
    return 0 if message.startswith("wrote") else 1


if __name__ == "__main__":
    sys.exit(main())
