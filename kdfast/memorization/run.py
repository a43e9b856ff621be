"""run_memorize(): the whole `kdfast memorize` job, one call: each model's per-record table from the result store
(measure(out=): keyed by the model's weights, the records and the settings), DIR/records.parquet (the records and
every model's results; prompt_cut marks a prompt cut from its start to fit), DIR/summary.json, printed figures."""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdfast.data import RecordError, load_membership, load_records
from kdfast.io import atomic_path, atomic_write_json, claim_folder
from kdfast.memorization.agreement import DEFAULT_TAUS, teacher_conditioned
from kdfast.memorization.measure import measure, prompts_cut, results
from kdfast.memorization.summary import group_summary
from kdfast.models import cut_warning, default_dtype, load_model, max_len_for, resolve_device

RECORDS_FILE, SUMMARY_FILE = "records.parquet", "summary.json"
PREFIX = {"model": "", "teacher": "teacher_"}  # column prefix of each model's results
TEXT_PREFIX_LEN = 32  # extraction prefix of plain {"text"} records when none is given


@dataclass
class MemorizeRun:
    """One `kdfast memorize` run. records: the file measured (with nonmembers: the members); teacher: adds the
    teacher-conditioned figures at `taus`; n_tokens: response tokens compared; approx_threshold: normalized edit
    distance of an approximate match; prefix_len / suffix_len: extraction's (None: the whole prompt / n_tokens;
    {"text"} records: TEXT_PREFIX_LEN); extraction: run the one-pass exact extraction; max_len: tokens a model may
    see (None: its positions); limit: records of each file; fields: the files' column names."""

    model: str
    records: str
    out: str
    nonmembers: str | None = None
    teacher: str | None = None
    n_tokens: int = 32
    approx_threshold: float = 0.1
    prefix_len: int | None = None
    suffix_len: int | None = None
    extraction: bool = True
    taus: tuple[float, ...] = DEFAULT_TAUS
    max_len: int | None = None
    batch_size: int = 32
    limit: int | None = None
    fields: dict | None = None
    progress: bool = True
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False


def _load(run: MemorizeRun) -> tuple[list[dict], list[int] | None]:
    fields = run.fields
    if run.nonmembers:
        records, labels = load_membership(run.records, run.nonmembers, fields)
        if run.limit is not None:
            keep = [i for c in (1, 0) for i in [j for j, m in enumerate(labels) if m == c][: run.limit]]
            records, labels = [records[i] for i in keep], [labels[i] for i in keep]
    else:
        records, labels = load_records(run.records, fields, run.limit), None
    if len({"text" in r for r in records}) > 1:
        raise RecordError("the records mix instruction records and plain {'text'} records; measure them in "
                          "separate runs (match accuracy needs a prompt, text records get extraction only)")
    return records, labels


def _settings(run: MemorizeRun, instruct: bool) -> dict:
    prefix = run.prefix_len if run.prefix_len is not None or instruct else TEXT_PREFIX_LEN
    return {"n_tokens": run.n_tokens, "approx_threshold": run.approx_threshold, "match": instruct,
            "extraction": run.extraction, "prefix_len": prefix, "suffix_len": run.suffix_len or run.n_tokens,
            "max_len": run.max_len, "dtype": run.dtype, "device": run.device}


def _measure(role: str, spec: str, records: list[dict], settings: dict, run: MemorizeRun, out: Path):
    """One model's per-record table (columns prefixed for the teacher), from the store when it is there."""
    device = resolve_device(run.device)
    dtype = getattr(torch, run.dtype) if run.dtype else default_dtype(device)
    model, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=run.trust_remote_code)
    max_len = max_len_for(model, run.max_len, spec)
    cut = prompts_cut(tokenizer, records, settings, max_len)
    warning = cut_warning(sum(cut), len(records), max_len, run.max_len is not None, " from their prompt's start")
    if warning:
        print(f"{role} {spec}: {warning}", file=sys.stderr, flush=True)
    table = measure(model, tokenizer, records, settings, max_len=max_len, out=out, batch_size=run.batch_size,
                    progress=run.progress, log=lambda message: print(f"{role} {spec}: {message}"))
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


def run_memorize(run: MemorizeRun) -> dict:
    """Measure run.model (and run.teacher) on the records; writes records.parquet and summary.json under run.out,
    prints the summary, and returns it."""
    start = time.perf_counter()
    records, labels = _load(run)
    settings = _settings(run, instruct="text" not in records[0])
    if not settings["match"] and not settings["extraction"]:
        raise ValueError("plain {'text'} records are measured by extraction only: drop --no-extraction")
    out = Path(run.out)
    roles = {"model": run.model, **({"teacher": run.teacher} if run.teacher else {})}
    with claim_folder(out, "--out"):  # one writer of records.parquet and summary.json; clears killed runs' temporaries
        tables = {role: _measure(role, spec, records, settings, run, out) for role, spec in roles.items()}
        summary = _summary(run, records, labels, settings, tables)
        _write(out, records, labels, summary, tables)
    print(f"{len(records)} records measured in {time.perf_counter() - start:.1f}s; "
          f"wrote {out / RECORDS_FILE} and {out / SUMMARY_FILE}")
    return summary


def _write(out: Path, records: list[dict], labels: list[int] | None, summary: dict, tables: dict) -> None:
    """records.parquet (the records and every model's per-record results) and summary.json; prints the summary."""
    import pandas as pd

    per_record = pd.concat([_record_columns(records, labels), *tables.values()], axis=1)
    with atomic_path(out / RECORDS_FILE) as tmp:
        per_record.to_parquet(tmp, index=False)
    atomic_write_json(out / SUMMARY_FILE, summary)
    print(format_summary(summary))


def _summary(run: MemorizeRun, records: list[dict], labels: list[int] | None, settings: dict, tables: dict) -> dict:
    """summary.json: the figures of each model, the records cut to fit, what was measured on fewer records."""
    summary = {"model": run.model, "teacher": run.teacher, "records": run.records, "nonmembers": run.nonmembers,
               "n_records": len(records), "n_members": sum(labels) if labels else None, "settings": settings,
               "records_cut_to_max_len": {}, "notices": _limit_notices(run, labels, len(records))}
    for role, table in tables.items():
        figures = group_summary(*results(table, settings, PREFIX[role]), membership=labels)
        summary[f"{role}_figures"] = figures
        summary["records_cut_to_max_len"][role] = int(table[PREFIX[role] + "prompt_cut"].sum())
        notice = _extraction_notice(figures["all"], settings)
        if notice:
            summary["notices"].append(f"{role}: {notice}")
    if "teacher" in tables and settings["match"]:
        on = np.asarray(labels) == 1 if labels else np.ones(len(records), dtype=bool)
        rows = teacher_conditioned(tables["teacher"]["teacher_accuracy"][on], tables["model"]["accuracy"][on],
                                   run.taus)
        summary["teacher_conditioned"] = {"on": "members" if labels else "all records",
                                          "rows": [r.to_dict() for r in rows]}
    return summary


def _limit_notices(run: MemorizeRun, labels: list[int] | None, n: int) -> list[str]:
    """Where --limit asks for more records than a file holds: the figures are then on fewer."""
    if run.limit is None:
        return []
    counts = {run.records: n} if labels is None else {run.records: sum(labels), run.nonmembers: n - sum(labels)}
    return [f"--limit {run.limit} asked, {k} records in {path}" for path, k in counts.items() if k < run.limit]


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
