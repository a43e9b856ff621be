"""Rewrite an audit's report from its results.json (e.g. with --redact before sharing it), or export a shareable
copy of the run with no record text (--export DIR)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="an audit run folder (holding results.json)")
    parser.add_argument("--redact", action="store_true", help="drop every record text from the report")
    parser.add_argument("--export", metavar="DIR",
                        help="write a new shareable folder DIR (report, summary, results.json, figures) without any "
                             "record text, implying --redact; the run folder is left as it is")


def main(args: argparse.Namespace) -> int:
    from kdfast.audit.run import ReportRun, run_report

    run_report(ReportRun(run=args.run, redact=args.redact, export=args.export))
    return 0
