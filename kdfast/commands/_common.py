"""What several subcommands share: the model and record-file arguments, and number flags checked by their hints."""
from __future__ import annotations

import argparse
import typing

from kdfast.validation import describe


def ranged(hint):
    """An argparse type for a number flag of type `hint` (PositiveInt, Fraction ...: the config fields' types), so a
    bad value stops the command before any work: "argument --limit: -5 is out of range; give a number >= 1"."""
    base, *bounds = typing.get_args(hint) if typing.get_origin(hint) is typing.Annotated else (hint,)

    def parse(text: str):
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {describe(base)}") from None
        problem = next((p for b in bounds if (p := b.complaint(value))), None)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def add_model_argument(parser: argparse.ArgumentParser, flag: str = "--model", required: bool = True,
                       help_text: str = "hub id, local folder, .gguf file, or 'smollm2'") -> None:
    parser.add_argument(flag, required=required, help=help_text)


def add_common_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")


def parse_fields(text: str | None) -> dict | None:
    """--fields 'input=context,response=output' -> {"input": "context", "response": "output"}."""
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(f"--fields {text!r}: give name=column pairs separated by commas, e.g. input=context")
    return {k.strip(): v.strip() for k, v in pairs}


def add_fields_argument(parser) -> None:
    parser.add_argument("--fields", default=None, type=parse_fields,
                        help="column names of your file, e.g. 'input=context,response=output' "
                             "(Dolly-15k: input=context)")
