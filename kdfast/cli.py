"""The `kdfast` command: audit, distill, attack, memorize, bench (each subcommand lives in kdfast/commands/)."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "audit": "the whole distillation privacy study, resumable, with a report",
    "distill": "distill a teacher into a student with one technique",
    "attack": "score membership-inference attacks on a model",
    "memorize": "measure memorization (greedy match accuracy, extraction)",
    "bench": "run the CPU benchmarks",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"kdfast.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"kdfast.commands.{args.command}")
    try:
        return module.main(args) or 0
    except (ValueError, FileNotFoundError) as e:  # the library's clear input errors: no traceback for users
        print(f"kdfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
