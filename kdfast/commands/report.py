"""Rewrite an audit's report from its results.json (e.g. with --redact before sharing it)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="an audit run folder (holding results.json)")
    parser.add_argument("--redact", action="store_true", help="drop every record text from the report")


def main(args: argparse.Namespace) -> int:
    from kdfast.audit.report import auc_table, text_table, write_report

    path = Path(args.run) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; give the folder of a finished `kdfast audit` run")
    results = json.loads(path.read_text())
    if args.redact:
        results.pop("examples", None)
        results["redacted"] = True
    paths = write_report(results, args.run)
    print(text_table(*auc_table(results)))
    print(f"\nReport: {paths['report']}")
    return 0
