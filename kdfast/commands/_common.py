"""What several subcommands share: model and record-file arguments, membership files, output folders."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdfast.data import RecordError, load_records, record_key


def add_model_argument(parser: argparse.ArgumentParser, flag: str = "--model", required: bool = True,
                       help_text: str = "hub id, local folder, .gguf file, or 'smollm2'") -> None:
    parser.add_argument(flag, required=required, help=help_text)


def add_common_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")


def load_membership(members: str | Path, nonmembers: str | Path, fields: dict | None = None) -> tuple[list[dict], list[int]]:
    """Records of the two files and their labels (1 member, 0 non-member); a record in both is an error."""
    m, n = load_records(members, fields), load_records(nonmembers, fields)
    both = {record_key(r) for r in m} & {record_key(r) for r in n}
    if both:
        example = next(r for r in m if record_key(r) in both)
        raise RecordError(f"{len(both)} record(s) are both in {members} and {nonmembers} (e.g. {str(example)[:120]}); "
                          "a sample in both sets makes the AUC meaningless: remove them from one file")
    return m + n, [1] * len(m) + [0] * len(n)
