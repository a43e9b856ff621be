"""Loading instruction / text records from jsonl, json, csv, parquet or the hub, with line-numbered errors."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterable, Iterator

INSTRUCTION_FIELDS = ("instruction", "input", "response", "category")
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


class RecordError(ValueError):
    """A record that cannot be used: names the file, the line (or row) and the fix."""


class Record(dict):
    """A record (a plain dict to every reader, JSON and hashes) that remembers where it was read: `where` is
    "FILE: line N" for the errors of later stages (tokenization) to name the user's file and line."""

    where: str = "record"

    def __init__(self, values: dict, where: str):
        super().__init__(values)
        self.where = where


def _open_text(path: Path):
    # utf-8-sig: a CSV saved by Excel starts with a byte-order mark, which would stick to the first column's name
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def _locate_decode_error(path: Path) -> RecordError:
    """The line of the first byte that is not UTF-8, and how to fix the file."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return RecordError(f"{path}: line {n} is not UTF-8 "
                                   f"(byte 0x{line[e.start]:02x} at column {e.start + 1}); save the file as UTF-8, "
                                   "e.g. iconv -f latin1 -t utf-8 FILE > NEW_FILE")
    return RecordError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _raw_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) pairs; `where` is "line N" or "row N" for the error messages."""
    try:
        yield from _rows(path)
    except UnicodeDecodeError:
        raise _locate_decode_error(path) from None


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if suffix == ".jsonl":
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{path}: line {n} is not valid JSON ({e.msg}); "
                                      "each line must be one JSON object") from None
    elif suffix == ".json":
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from None
        if not isinstance(data, list):
            raise RecordError(f"{path}: a .json file must hold a list of records (use .jsonl for one record per line)")
        yield from ((f"record {i}", r) for i, r in enumerate(data))
    elif suffix == ".csv":
        with _open_text(path) as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                yield f"line {n}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i}", row
    else:
        raise RecordError(f"{path}: unknown file type {path.suffix!r}; "
                          f"use one of {', '.join(FORMATS)} (optionally .gz)")


def normalize(row: object, fields: dict[str, str] | None = None, where: str = "record") -> dict:
    """One validated record: {"instruction", "input"?, "response", "category"?} or {"text"}.

    `fields` maps kdfast's names to the source's (e.g. {"input": "context"} for Dolly-15k).
    """
    if not isinstance(row, dict):
        raise RecordError(f"{where}: a record must be an object with 'instruction' and 'response' (or 'text'), "
                          f"got {type(row).__name__}")
    fields = fields or {}
    get = lambda name: row.get(fields.get(name, name))  # noqa: E731
    if get("text") is not None and get("instruction") is None:
        text = get("text")
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: 'text' is empty; remove the record or fill it in")
        return Record({"text": text}, where)
    missing = [name for name in ("instruction", "response") if get(name) is None]
    if missing:
        have = ", ".join(sorted(map(str, row))) or "nothing"
        raise RecordError(f"{where}: missing field(s) {missing} (the record has {have}); "
                          "map your column names with --fields instruction=COLUMN,response=COLUMN (the audit: "
                          "data.fields: {instruction: COLUMN, response: COLUMN})")
    record = Record({}, where)
    for name in INSTRUCTION_FIELDS:
        value = get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RecordError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
        record[name] = value
    if not record["response"].strip():
        raise RecordError(f"{where}: empty response; remove the record or fill it in")
    if not record["instruction"].strip():
        raise RecordError(f"{where}: empty instruction; remove the record or fill it in")
    return record


def load_records(path: str | Path, fields: dict[str, str] | None = None, limit: int | None = None) -> list[dict]:
    """Records from a .jsonl/.json/.csv/.parquet file (optionally .gz); a bad record raises RecordError."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such file")
    records = []
    for where, row in _raw_rows(path):
        records.append(normalize(row, fields, f"{path}: {where}"))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise RecordError(f"{path}: holds no records")
    return records


def load_hub_dataset(name: str, split: str = "train", fields: dict[str, str] | None = None,
                     limit: int | None = None) -> list[dict]:
    """Records of a hub dataset through `datasets` (downloads: only when the user asks for one)."""
    import datasets

    dataset = datasets.load_dataset(name, split=split)
    return [normalize(r, fields, f"{name}[{split}] record {i}") for i, r in enumerate(_take(dataset, limit))]


def _take(items: Iterable, limit: int | None) -> Iterable:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


def record_key(record: dict) -> tuple:
    """What makes two records the same sample (whitespace and case folded)."""
    norm = lambda s: " ".join(s.split()).lower()  # noqa: E731
    return tuple(norm(record.get(k, "")) for k in ("text", "instruction", "input", "response"))


def bundled_records() -> list[dict]:
    """The bundled default: WordNet 3.0 word → definition pairs (Princeton's licence: data/bundled/WORDNET_LICENSE)."""
    return load_records(Path(__file__).parent / "bundled" / "wordnet_definitions.jsonl.gz")
