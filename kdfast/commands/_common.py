"""What several subcommands share: model and record-file arguments, membership files, the records' length cut."""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from kdfast.data import RecordError, load_records, record_key
from kdfast.models import model_positions
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


def load_membership(members: str | Path, nonmembers: str | Path,
                    fields: dict | None = None) -> tuple[list[dict], list[int]]:
    """Records of the two files and their labels (1 member, 0 non-member); a record in both is an error."""
    m, n = load_records(members, fields), load_records(nonmembers, fields)
    both = {record_key(r) for r in m} & {record_key(r) for r in n}
    if both:
        first = next(r for r in m if record_key(r) in both)
        twin = next(r for r in n if record_key(r) == record_key(first))
        raise RecordError(f"{len(both)} record(s) are both in {members} and {nonmembers} (e.g. {first.where} and "
                          f"{twin.where}: {str(first)[:120]}); a sample in both sets makes the AUC meaningless: "
                          "remove them from one file")
    return m + n, [1] * len(m) + [0] * len(n)


def max_len_for(model, max_len: int | None, spec: str) -> int | None:
    """--max-len, or the model's positions when it is not given (None when the model names none: no cut)."""
    positions = model_positions(model)
    if max_len is not None and positions is not None and max_len > positions:
        raise ValueError(f"--max-len {max_len} is more than the {positions} positions of {spec}; give at most "
                         f"{positions}, or leave --max-len out to cut records to the model's positions")
    return positions if max_len is None else max_len


def cut_warning(n_cut: int, n: int, max_len: int | None, given: bool, how: str = "") -> str | None:
    """What a run prints before the long work when it cuts records to max_len (None when it cuts none)."""
    if not n_cut:
        return None
    source = "(--max-len)" if given else "(the model's positions); pass --max-len to choose"
    return f"warning: {n_cut} of {n} records cut to {max_len} tokens{how} {source}"
