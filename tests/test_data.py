"""Records (formats, errors with line numbers), the study split, encoding and batching."""
import json

import pytest

from kdfast import data
from kdfast.models import tiny_tokenizer

RECORDS = [{"instruction": f"Define word {i}.", "response": f"definition number {i}", "category": "noun"}
           for i in range(20)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz"])
def test_formats_round_trip(tmp_path, suffix):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"r{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif suffix == ".jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode()))
    elif suffix == ".json":
        path.write_text(json.dumps(RECORDS))
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(RECORDS[0]))
            w.writeheader()
            w.writerows(RECORDS)
    else:
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert data.load_records(path) == RECORDS


def test_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(data.RecordError, match=r"bad.jsonl: line 2 is not valid JSON"):
        data.load_records(bad)
    bad.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps({"instruction": "x", "response": "  "}) + "\n")
    with pytest.raises(data.RecordError, match=r"line 3: empty response"):
        data.load_records(bad)
    bad.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    with pytest.raises(data.RecordError, match=r"line 1: missing field\(s\) \['instruction', 'response'\]"):
        data.load_records(bad)
    assert data.load_records(bad, fields={"instruction": "prompt", "response": "answer"}) == [
        {"instruction": "x", "response": "y"}]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(data.RecordError, match="holds no records"):
        data.load_records(tmp_path / "empty.jsonl")
    with pytest.raises(data.RecordError, match="unknown file type"):
        data.load_records(bad.rename(tmp_path / "bad.txt"))
    with pytest.raises(data.RecordError, match="no such file"):
        data.load_records(tmp_path / "missing.jsonl")


def test_text_records_and_template():
    assert data.normalize({"text": "hello"}) == {"text": "hello"}
    assert data.prompt_text({"text": "hello"}) == ""
    with_input = data.prompt_text({"instruction": "Sum.", "input": "1 2", "response": "3"})
    assert "### Input:\n1 2" in with_input and with_input.endswith("### Response:\n")


def test_study_split_dedupes_and_balances():
    train = RECORDS + [dict(RECORDS[0], response="DEFINITION number 0 ")]  # a duplicate up to case/space
    validation = [RECORDS[1], {"instruction": "v", "response": "w"}, {"instruction": "u", "response": "z"}]
    split = data.study_split(train, validation, seed=3)
    assert split.dropped == {"duplicates in train": 1, "duplicates in validation": 0,
                             "validation records also in train": 1}
    keys = lambda rs: {data.record_key(r) for r in rs}  # noqa: E731
    assert (not keys(split.private) & keys(split.public)
            and not keys(split.nonmembers) & keys(split.private + split.public))
    assert len(split.private) == 10 and len(split.nonmembers) == 2
    members, nonmembers = split.balanced()
    assert len(members) == len(nonmembers) == 2
    assert data.study_split(RECORDS, seed=5).private == data.study_split(RECORDS, seed=5).private


def test_encode_masks_prompt_and_checks_lengths():
    tok = tiny_tokenizer()
    enc = data.encode(tok, RECORDS[0])
    assert enc.labels[: enc.prompt_len] == [data.IGNORE_INDEX] * enc.prompt_len
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:] and enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[enc.prompt_len:-1]) == RECORDS[0]["response"]
    with pytest.raises(data.RecordError, match="max_prompt_len=5"):
        data.encode(tok, RECORDS[0], max_prompt_len=5)
    with pytest.raises(data.RecordError, match="no room for the response"):
        data.encode(tok, RECORDS[0], max_len=enc.prompt_len)
    assert len(data.encode(tok, RECORDS[0], max_len=enc.prompt_len + 2)) == enc.prompt_len + 2
    kept = data.encode_all(tok, [RECORDS[0], {"instruction": "x " * 200, "response": "y"}], max_prompt_len=100,
                           long_prompts="drop")[1]
    assert kept == [0]


def test_token_budget_batches():
    lengths = [5, 50, 7, 6, 51, 200, 8]
    batches = data.token_budget_batches(lengths, batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 100
    assert [5] in batches  # the over-budget record alone
    assert all(len(b) <= 2 for b in data.token_budget_batches(lengths, 1000, max_batch=2))


def test_bundled_records():
    records = data.bundled_records()
    assert len(records) == 6000 and len({data.record_key(r) for r in records}) == 6000
    assert all(r["response"].strip() and r["instruction"].startswith("Define the ") for r in records)
