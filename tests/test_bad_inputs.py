"""The data files a user gets wrong, through the real reader and the CLI: each error names the file, the line and
the fix; a CSV saved with a UTF-8 byte-order mark (Excel) reads as any other."""
import gzip
import json
import re

import pytest

from kdfast.cli import main
from kdfast.data import RecordError, load_membership, load_records

GOOD = b'{"instruction": "Define cat.", "response": "a small pet"}\n'

# (file name, its bytes, the error after "<file>: "; None: it reads)
CASES = {
    "malformed JSONL line": ("a.jsonl", GOOD + GOOD + b'{"oops"\n',
                             r"line 3 is not valid JSON \(.*\); each line must be one JSON object"),
    "empty file": ("a.jsonl", b"", r"holds no records"),
    "blank lines only": ("a.jsonl", b"\n  \n", r"holds no records"),
    "missing field": ("a.jsonl", GOOD + b'{"instruction": "x"}\n',
                      r"line 2: missing field\(s\) \['response'\] \(the record has instruction\); map your column "
                      r"names with --fields instruction=COLUMN,response=COLUMN"),
    "CSV with other column names": ("a.csv", b"question,answer\nq,a\n", r"line 2: missing field\(s\) "
                                    r"\['instruction', 'response'\].*--fields"),
    "not an object": ("a.jsonl", b"[1, 2]\n", r"line 1: a record must be an object"),
    "empty response": ("a.jsonl", b'{"instruction": "x", "response": " "}\n', r"line 1: empty response"),
    "a number for text": ("a.jsonl", b'{"instruction": 3, "response": "y"}\n',
                          r"line 1: field 'instruction' must be text"),
    "non-UTF-8 JSONL": ("a.jsonl", GOOD + '{"instruction": "café", "response": "x"}\n'.encode("latin-1"),
                        r"line 2 is not UTF-8 \(byte 0xe9 at column 21\); save the file as UTF-8, e.g. iconv"),
    "non-UTF-8 CSV": ("a.csv", "instruction,response\nok,fine\ncafé,x\n".encode("latin-1"),
                      r"line 3 is not UTF-8 \(byte 0xe9 at column 4\)"),
    "non-UTF-8 gzipped JSONL": ("a.jsonl.gz", gzip.compress('{"instruction": "é"}\n'.encode("latin-1")),
                                r"line 1 is not UTF-8"),
    "JSON that is not a list": ("a.json", b'{"instruction": "x", "response": "y"}',
                                r"a .json file must hold a list of records \(use .jsonl for one record per line\)"),
    "broken JSON": ("a.json", b'[\n{"instruction": "x",\n', r"not valid JSON at line 3"),
    "unknown file type": ("a.txt", b"hello\n", r"unknown file type '.txt'; use one of .jsonl, .json, .csv, .parquet"),
    "CSV with a UTF-8 BOM": ("a.csv", b"\xef\xbb\xbfinstruction,response\nDefine cat.,a small pet\n", None),
    "JSONL with a UTF-8 BOM": ("a.jsonl", b"\xef\xbb\xbf" + GOOD, None),
}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_bytes(b'{"instruction": "Define dog.", "response": "a loyal pet"}\n')
    return path


def _write(tmp_path, case: str):
    name, data, error = CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    return path, error


@pytest.mark.parametrize("case", CASES)
def test_reader(tmp_path, case):
    path, error = _write(tmp_path, case)
    if error is None:
        assert load_records(path) == [{"instruction": "Define cat.", "response": "a small pet"}]
        return
    with pytest.raises(RecordError, match=f"^{re.escape(str(path))}: {error}"):
        load_records(path)


@pytest.mark.parametrize("case", [c for c, (_, _, error) in CASES.items() if error])
@pytest.mark.parametrize("command", ["attack", "distill"])
def test_cli(tmp_path, good, capsys, case, command):
    path, error = _write(tmp_path, case)
    inputs = {"attack": ["--model", "tiny:llama", "--members", str(path), "--nonmembers", str(good)],
              "distill": ["--student", "tiny:llama", "--technique", "sft", "--data", str(path)]}[command]
    assert main([command, *inputs, "--out", str(tmp_path / "out")]) == 2
    assert re.search(f"^kdfast {command}: error: {re.escape(str(path))}: {error}", capsys.readouterr().err)


def test_missing_file(tmp_path, good, capsys):
    assert main(["attack", "--model", "tiny:llama", "--members", str(tmp_path / "nope.jsonl"), "--nonmembers",
                 str(good), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err


def test_member_and_nonmember_overlap_names_both_lines(tmp_path, capsys):
    members, nonmembers = tmp_path / "m.jsonl", tmp_path / "n.csv"
    members.write_bytes(b'{"instruction": "Define dog.", "response": "a loyal pet"}\n' + GOOD)
    nonmembers.write_text("instruction,response\nDefine fish.,it swims\n define  CAT.,A small pet\n")
    want = (f"1 record(s) are both in {members} and {nonmembers} (e.g. {members}: line 2 and {nonmembers}: line 3: ")
    with pytest.raises(RecordError) as caught:
        load_membership(members, nonmembers)
    assert str(caught.value).startswith(want) and str(caught.value).endswith("remove them from one file")
    assert main(["attack", "--model", "tiny:llama", "--members", str(members), "--nonmembers", str(nonmembers),
                 "--out", str(tmp_path / "out")]) == 2
    assert want in capsys.readouterr().err


def test_validation_that_overlaps_the_source(tmp_path, capsys):
    """data.validation holding only records of data.source: said so, not 'give at least 3 distinct records'."""
    source = tmp_path / "source.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Define w{i}.", "response": f"d{i}"}) + "\n"
                              for i in range(12)))
    assert main(["audit", "--preset", "tiny", "--check", "--set", f"data.source={source}",
                 "--set", f"data.validation={source}"]) == 2
    err = capsys.readouterr().err
    assert "every one of the 12 validation (non-member) records is also in the training source: the two overlap " \
           "entirely; give non-members that are not in the source (the audit's data.validation)" in err
    assert "at least 3 distinct" not in err
