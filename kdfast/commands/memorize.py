"""Measure memorization: the study's greedy match accuracy of the first response tokens (exact and within an
edit distance), exact extraction in one forward pass, the member - non-member gap, and with a teacher how
much of what it memorized the model reproduces.

Writes DIR/records.parquet (one row per record; prompt_cut marks a prompt cut from its start to fit the model's
positions or --max-len), DIR/summary.json, and DIR/stages/ (each model's results, reused by a rerun with the same
model weights, records and settings).
"""
from __future__ import annotations

import argparse

from kdfast.commands._common import add_common_model_options, add_fields_argument, add_model_argument, ranged
from kdfast.memorization.agreement import DEFAULT_TAUS
from kdfast.memorization.run import MemorizeRun, run_memorize
from kdfast.validation import NonNegativeFloat, PositiveInt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--records", "--members", dest="records", required=True,
                        help="records to measure (.jsonl/.json/.csv/.parquet, optionally .gz); "
                             "with --nonmembers: the members")
    parser.add_argument("--nonmembers", help="non-member records: adds member / non-member figures and their gap")
    add_model_argument(parser, "--teacher", required=False,
                       help_text="the teacher (hub id, folder, .gguf, 'smollm2'): adds teacher-conditioned figures")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-tokens", type=ranged(PositiveInt), default=32,
                        help="response tokens compared (default 32, the study's)")
    parser.add_argument("--approx-threshold", type=ranged(NonNegativeFloat), default=0.1,
                        help="approximate match: normalized token edit distance at most this (default 0.1)")
    parser.add_argument("--prefix-len", type=ranged(PositiveInt), default=None,
                        help="extraction prefix: the last N prompt tokens (default: the whole prompt); for plain "
                             "{'text'} records the first N tokens (default 32)")
    parser.add_argument("--suffix-len", type=ranged(PositiveInt), default=None,
                        help="extraction suffix length (default: --n-tokens)")
    parser.add_argument("--no-extraction", action="store_true", help="skip the one-pass exact extraction test")
    parser.add_argument("--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS),
                        help="teacher-conditioned thresholds (comma-separated)")
    parser.add_argument("--max-len", type=ranged(PositiveInt), default=None,
                        help="tokens a model may see: a longer prompt + generated tokens loses the prompt's start "
                             "(default: the model's positions)")
    parser.add_argument("--batch-size", type=ranged(PositiveInt), default=32, help="records per batch (default 32)")
    parser.add_argument("--limit", type=ranged(PositiveInt), default=None, help="use at most N records of each file")
    add_fields_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_common_model_options(parser)


def main(args: argparse.Namespace) -> int:
    run_memorize(MemorizeRun(
        model=args.model, records=args.records, out=args.out, nonmembers=args.nonmembers, teacher=args.teacher,
        n_tokens=args.n_tokens, approx_threshold=args.approx_threshold, prefix_len=args.prefix_len,
        suffix_len=args.suffix_len, extraction=not args.no_extraction,
        taus=tuple(float(t) for t in args.taus.split(",") if t.strip()), max_len=args.max_len,
        batch_size=args.batch_size, limit=args.limit, fields=args.fields, progress=not args.quiet, device=args.device,
        dtype=args.dtype, trust_remote_code=args.trust_remote_code))
    return 0
