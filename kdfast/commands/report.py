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
    from kdfast.audit.report import auc_table, export_run, read_results, redacted, text_table, write_report

    results = read_results(args.run)
    if args.export:
        paths = export_run(args.run, args.export)
    else:
        paths = write_report(redacted(results) if args.redact else results, args.run)
    print(text_table(*auc_table(results)))
    print(f"\nReport: {paths['report']}" + (f"\nExported to {args.export}: no record text" if args.export else ""))
    return 0
