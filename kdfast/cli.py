"""The `kdfast` command: audit, distill, attack, memorize, report, bench (each subcommand lives in kdfast/commands/)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "audit": "the whole distillation privacy study, resumable, with a report",
    "distill": "distill a teacher into a student with one technique",
    "attack": "score membership-inference attacks on a model",
    "memorize": "measure memorization (greedy match accuracy, extraction)",
    "report": "rewrite an audit's report from its results.json (e.g. --redact)",
    "bench": "run the CPU benchmarks",
    "plan": "predict the peak memory of a distillation run from the configs, before it starts",
    "cache-teacher": "capture a teacher's top-k log-probs once, to distill without loading it",
}


TINY_MODELS = ("Every MODEL option also takes tiny:llama, tiny:gpt2 or tiny:opt: random-init tiny models with a "
               "bundled tokenizer, to try a command in seconds without a download.")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the named command's module is imported (each pulls in heavy libraries)."""
    from kdfast import __version__

    parser = argparse.ArgumentParser(prog="kdfast", description=__doc__, epilog=TINY_MODELS)
    parser.add_argument("--version", action="version", version=f"kdfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, epilog=TINY_MODELS)
        if name == command:
            module = importlib.import_module(f"kdfast.commands.{name.replace('-', '_')}")
            sub_parser.description = module.__doc__
            module.add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    if getattr(args, "quiet", False):
        _silence_libraries()
    module = importlib.import_module(f"kdfast.commands.{args.command.replace('-', '_')}")
    try:
        return module.main(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # the library's input errors: no traceback
        print(f"kdfast {args.command}: error: {e}", file=sys.stderr)
        return 2


def _silence_libraries() -> None:
    """--quiet: no loading bars or notices from transformers and huggingface_hub either."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
