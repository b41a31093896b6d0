"""Command line: `python -m paligemma <command>` (also installed as `paligemma`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .parity import run_case


def _parity(args: argparse.Namespace) -> int:
    ok = True
    reports = []
    for case_dir in args.case_dirs:
        report = run_case(case_dir)
        print(report.table(), end="\n\n")
        reports.append(report.to_json())
        ok &= report.ok
    if args.json:
        Path(args.json).write_text(
            json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n"
        )
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paligemma", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import parity

    p = sub.add_parser(
        "parity",
        help="compare our model with official JAX outputs, stage by stage",
        description="Runs our model on one or more case directories and compares every recorded "
        "stage with the official big_vision outputs. Exits 1 if any stage fails.\n\n"
        + parity.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m paligemma parity parity_tests/data/pg2_tiny --json report.json",
    )
    p.add_argument("case_dirs", nargs="+", metavar="CASE_DIR", help="case directory")
    p.add_argument(
        "--json",
        metavar="FILE",
        help='also write {"case", "ok", "stages": [{"name", "max_abs_err", "tol", '
        '"ok", ...}]} (a list of those for several cases)',
    )
    p.set_defaults(func=_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
