"""Benchmark-format membership files: one text column and a 0/1 label column (WikiMIA's input/label, MIMIR)."""
from __future__ import annotations

from pathlib import Path

from kdfast.data.records import RecordError, _raw_rows, load_records, record_key

LABELS = {0: 0, 1: 1, "0": 0, "1": 1}  # True/False hash as 1/0


def load_labeled(path: str | Path, text_column: str = "input", label_column: str = "label",
                 limit: int | None = None) -> tuple[list[dict], list[int]]:
    """({"text"} records, labels: 1 member, 0 non-member) of a .jsonl/.json/.csv/.parquet file (optionally .gz).

    A row without one of the columns, with an empty text or a label other than 0/1 raises RecordError naming
    the file and the line (or row).
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such file")
    records, labels = [], []
    for where, row in _raw_rows(path):
        if not isinstance(row, dict):
            raise RecordError(f"{path}: {where}: expected an object with columns {text_column!r} and {label_column!r}")
        for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in row:
                have = ", ".join(map(str, row)) or "none"
                raise RecordError(f"{path}: {where}: no column {column!r} (the row has {have}); name the right one "
                                  f"with {flag}")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{path}: {where}: column {text_column!r} is empty or not text; fix or remove the row")
        if isinstance(label, float) and label in (0.0, 1.0):
            label = int(label)
        if not isinstance(label, (int, str, bool)) or label not in LABELS:
            raise RecordError(f"{path}: {where}: label {label!r} in column {label_column!r} is not 0 or 1 "
                              "(1 = member, 0 = non-member)")
        records.append({"text": text})
        labels.append(LABELS[label])
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise RecordError(f"{path}: holds no records")
    return records, labels


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
