"""Measure memorization: the study's greedy match accuracy of the first response tokens (exact and within an
edit distance), exact extraction in one forward pass, the member - non-member gap, and with a teacher how
much of what it memorized the model reproduces.

Writes DIR/records.parquet (one row per record; prompt_cut marks a prompt cut from its start to fit the model's
positions or --max-len), DIR/summary.json, and DIR/stages/ (each model's results, reused by a rerun with the same
model weights, records and settings).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdfast.commands._common import (
    add_common_model_options,
    add_fields_argument,
    add_model_argument,
    cut_warning,
    load_membership,
    max_len_for,
    ranged,
)
from kdfast.data import RecordError, load_records
from kdfast.io import atomic_path, atomic_write_json, claim_folder
from kdfast.validation import NonNegativeFloat, PositiveInt

RECORDS_FILE, SUMMARY_FILE = "records.parquet", "summary.json"
PREFIX = {"model": "", "teacher": "teacher_"}  # column prefix of each model's results


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
    parser.add_argument("--taus", default="0.5,0.6,0.7,0.8,0.9",
                        help="teacher-conditioned thresholds (comma-separated)")
    parser.add_argument("--max-len", type=ranged(PositiveInt), default=None,
                        help="tokens a model may see: a longer prompt + generated tokens loses the prompt's start "
                             "(default: the model's positions)")
    parser.add_argument("--batch-size", type=ranged(PositiveInt), default=32, help="records per batch (default 32)")
    parser.add_argument("--limit", type=ranged(PositiveInt), default=None, help="use at most N records of each file")
    add_fields_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_common_model_options(parser)


def _load(args) -> tuple[list[dict], list[int] | None]:
    fields = args.fields
    if args.nonmembers:
        records, labels = load_membership(args.records, args.nonmembers, fields)
        if args.limit is not None:
            keep = [i for c in (1, 0) for i in [j for j, m in enumerate(labels) if m == c][: args.limit]]
            records, labels = [records[i] for i in keep], [labels[i] for i in keep]
    else:
        records, labels = load_records(args.records, fields, args.limit), None
    if len({"text" in r for r in records}) > 1:
        raise RecordError("the records mix instruction records and plain {'text'} records; measure them in "
                          "separate runs (match accuracy needs a prompt, text records get extraction only)")
    return records, labels


def _settings(args, instruct: bool) -> dict:
    prefix = args.prefix_len if args.prefix_len is not None or instruct else 32
    return {"n_tokens": args.n_tokens, "approx_threshold": args.approx_threshold, "match": instruct,
            "extraction": not args.no_extraction, "prefix_len": prefix, "suffix_len": args.suffix_len or args.n_tokens,
            "max_len": args.max_len, "dtype": args.dtype, "device": args.device}


def _measure(role: str, spec: str, records: list[dict], settings: dict, args, out: Path):
    """One model's per-record table (columns prefixed for the teacher), from the store when it is there."""
    from kdfast import memorization as mem
    from kdfast.models import default_dtype, load_model, resolve_device

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    model, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    max_len = max_len_for(model, args.max_len, spec)
    cut = mem.prompts_cut(tokenizer, records, settings, max_len)
    warning = cut_warning(sum(cut), len(records), max_len, args.max_len is not None, " from their prompt's start")
    if warning:
        print(f"{role} {spec}: {warning}", file=sys.stderr, flush=True)
    table = mem.measure(model, tokenizer, records, settings, max_len=max_len, out=out, batch_size=args.batch_size,
                        progress=not args.quiet, log=lambda message: print(f"{role} {spec}: {message}"))
    del model
    gc.collect()
    return table.add_prefix(PREFIX[role])


def _record_columns(records: list[dict], labels: list[int] | None):
    import pandas as pd

    cols = {"id": np.arange(len(records))}
    if labels is not None:
        cols["member"] = np.asarray(labels)
    for name in ("category", "instruction", "input", "response", "text"):
        if any(name in r for r in records):
            cols[name] = [r.get(name) for r in records]
    return pd.DataFrame(cols)


def main(args) -> int:

    start = time.perf_counter()
    taus = tuple(float(t) for t in args.taus.split(",") if t.strip())
    records, labels = _load(args)
    settings = _settings(args, instruct="text" not in records[0])
    if not settings["match"] and not settings["extraction"]:
        raise ValueError("plain {'text'} records are measured by extraction only: drop --no-extraction")
    out = Path(args.out)
    roles = {"model": args.model, **({"teacher": args.teacher} if args.teacher else {})}
    with claim_folder(out, "--out"):  # one writer of records.parquet and summary.json; clears killed runs' temporaries
        tables = {role: _measure(role, spec, records, settings, args, out) for role, spec in roles.items()}
        _write(out, records, labels, _summary(args, records, labels, settings, tables, taus), tables)
    print(f"{len(records)} records measured in {time.perf_counter() - start:.1f}s; "
          f"wrote {out / RECORDS_FILE} and {out / SUMMARY_FILE}")
    return 0


def _write(out: Path, records: list[dict], labels: list[int] | None, summary: dict, tables: dict) -> None:
    """records.parquet (the records and every model's per-record results) and summary.json; prints the summary."""
    import pandas as pd

    per_record = pd.concat([_record_columns(records, labels), *tables.values()], axis=1)
    with atomic_path(out / RECORDS_FILE) as tmp:
        per_record.to_parquet(tmp, index=False)
    atomic_write_json(out / SUMMARY_FILE, summary)
    print(format_summary(summary))


def _summary(args, records: list[dict], labels: list[int] | None, settings: dict, tables: dict, taus) -> dict:
    """summary.json: the figures of each model, the records cut to fit, what was measured on fewer records."""
    from kdfast import memorization as mem

    summary = {"model": args.model, "teacher": args.teacher, "records": args.records, "nonmembers": args.nonmembers,
               "n_records": len(records), "n_members": sum(labels) if labels else None, "settings": settings,
               "records_cut_to_max_len": {}, "notices": _limit_notices(args, labels, len(records))}
    for role, table in tables.items():
        figures = mem.group_summary(*mem.results(table, settings, PREFIX[role]), membership=labels)
        summary[f"{role}_figures"] = figures
        summary["records_cut_to_max_len"][role] = int(table[PREFIX[role] + "prompt_cut"].sum())
        notice = _extraction_notice(figures["all"], settings)
        if notice:
            summary["notices"].append(f"{role}: {notice}")
    if "teacher" in tables and settings["match"]:
        on = np.asarray(labels) == 1 if labels else np.ones(len(records), dtype=bool)
        rows = mem.teacher_conditioned(tables["teacher"]["teacher_accuracy"][on], tables["model"]["accuracy"][on], taus)
        summary["teacher_conditioned"] = {"on": "members" if labels else "all records",
                                          "rows": [r.to_dict() for r in rows]}
    return summary


def _limit_notices(args, labels: list[int] | None, n: int) -> list[str]:
    """Where --limit asks for more records than a file holds: the figures are then on fewer."""
    if args.limit is None:
        return []
    counts = {args.records: n} if labels is None else {args.records: sum(labels), args.nonmembers: n - sum(labels)}
    return [f"--limit {args.limit} asked, {k} records in {path}" for path, k in counts.items() if k < args.limit]


def _extraction_notice(figures: dict, settings: dict) -> str | None:
    """Where extraction checked fewer records than were measured: how many, and what the others lack."""
    checked, n = figures.get("extraction_checked", figures["n"]), figures["n"]
    if checked == n:
        return None
    if settings["match"]:  # instruction records: the prefix is the prompt, the suffix the response's start
        need, fix = f"whose response holds a {settings['suffix_len']}-token suffix (EOS included)", "--suffix-len"
    else:
        need = f"long enough for a {settings['prefix_len']}-token prefix + {settings['suffix_len']}-token suffix"
        fix = "--prefix-len/--suffix-len"
    return f"extraction checked {checked} of {n} records, those {need}; lower {fix} to check more"


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def format_summary(summary: dict) -> str:
    """The short readable summary printed at the end of a run."""
    s = summary["settings"]
    n_mem = summary["n_members"]
    lines = [f"{summary['n_records']} records" + (f" ({n_mem} members, {summary['n_records'] - n_mem} non-members)"
                                                   if n_mem is not None else "")
             + (f"; greedy match over the first {s['n_tokens']} response tokens" if s["match"] else "")
             + (f"; extraction of {s['suffix_len']} tokens" if s["extraction"] else "")]
    header = f"  {'':12}" + (f"{'accuracy':>9} {'exact':>7} {'approx':>7}" if s["match"] else "") \
        + (f" {'extractable':>12}" if s["extraction"] else "")
    for role in ("model", "teacher"):
        figures = summary.get(f"{role}_figures")
        if not figures:
            continue
        lines += [f"{role} {summary[role]}:", header]
        for group in ("members", "nonmembers", "gap") if n_mem is not None else ("all",):
            f = figures[group]
            row = f"  {group.replace('nonmembers', 'non-members'):12}"
            if s["match"]:
                row += f"{f['accuracy']:>+9.3f} " if group == "gap" else f"{f['accuracy']:>9.3f} "
                row += f"{_pct(f['exact_rate']):>7} {_pct(f['approx_rate']):>7}"
            if s["extraction"]:
                row += f" {_pct(f['extractable_rate']):>12}"
            lines.append(row)
    fit = f"--max-len {s['max_len']}" if s["max_len"] else "the model's positions"
    lines += [f"{role}: {n} of {summary['n_records']} records cut from their prompt's start to fit {fit}"
              for role, n in summary["records_cut_to_max_len"].items() if n]
    lines += [f"note: {n}" for n in summary["notices"]]
    tc = summary.get("teacher_conditioned")
    if tc:
        lines.append(f"teacher-conditioned ({tc['on']}): records the teacher matches above tau -> the model's "
                     "mean accuracy on them, and how many it also matches above tau")
        for r in tc["rows"]:
            lines.append(f"  tau {r['tau']:.2f}: {r['n_teacher']:5d} records, mean {r['student_mean']:.3f}, "
                         f"also above {r['n_both']}/{r['n_teacher']} ({_pct(r['student_fraction'])})")
    return "\n".join(lines)
