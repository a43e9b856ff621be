"""summary.md on hand-made results: every user text escaped, the tables the README promises; export refusals."""
import json
import re

import pytest

from kdfast.audit.report import FPRS, export_run, write_report

SCRIPT = "<script>x</script>"
SECRET = "quokka-7731"  # in the examples only


def _model(mid: str, label: str, size: str, auc: float, blocks: dict | None = None) -> dict:
    return {"id": mid, "role": "student", "label": label, "technique": "kd", "size": size,
            "auc": {"loss": auc}, "auc_ci95": {"loss": [auc - 0.05, auc + 0.04]},
            "tpr_at_fpr": {"loss": {f: 0.1 + i / 10 for i, f in enumerate(FPRS)}},
            "roc": {"loss": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}},
            "memorization": {"member": 0.1, "nonmember": 0.05, "gap": 0.05}, "utility": {"rouge_l": 0.3},
            "mope_block": blocks}


def _results(name: str = "hand-made", size: str = "small") -> dict:
    return {"name": name, "attacks": ["loss"], "split": {"private": 6, "public": 6, "nonmembers": 6},
            "machine": "test", "time_seconds": 1.0, "ablations": {}, "redacted": False,
            "models": [_model(f"{size}/kd", f"KD ({size})", size, 0.61, {"0": 0.58, "1": 0.66}),
                       _model(f"{size}/gkd", f"GKD ({size})", size, 0.72)],
            "examples": [{"instruction": f"{SECRET} prompt", "response": f"{SECRET} answer",
                          "outputs": {"KD": f"{SECRET} generation"}}]}


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_summary_escapes_the_name_and_size_keys(tmp_path):
    paths = write_report(_results(name=SCRIPT, size="a|b"), tmp_path)
    summary = paths["summary"].read_text()
    assert "# kdfast audit: &lt;script&gt;x&lt;/script&gt;" in summary
    assert "<script>" not in summary and "</script>" not in summary
    assert "| KD (a\\|b) |" in summary and "a|b" not in summary
    for table in re.findall(r"(?:^\|.*\n)+", summary, flags=re.M):  # a pipe in a cell would add a column
        lines = table.splitlines()
        assert all(_unescaped_pipes(line) == _unescaped_pipes(lines[0]) for line in lines), table
    assert SCRIPT not in paths["report"].read_text()


def test_summary_holds_intervals_tpr_at_low_fpr_and_per_block_mope(tmp_path):
    summary = write_report(_results(), tmp_path)["summary"].read_text()
    assert "## Bootstrap 95% intervals of the AUCs" in summary and "| KD (small) | [0.56, 0.65] |" in summary
    assert "## TPR at low FPR (loss attack)" in summary
    assert "| model | AUC | 95% CI | " + " | ".join(f"TPR@FPR≤{f}" for f in FPRS) + " |" in summary
    assert "| GKD (small) | 0.72 | [0.67, 0.76] | 0.100 | 0.200 | 0.300 | 0.400 | 0.500 |" in summary
    assert "## Per-block MoPe AUC\n\n| model | block 0 | block 1 |" in summary
    per_block = summary.split("## Per-block MoPe AUC")[1].split("\n## ")[0]
    assert "| KD (small) | 0.58 | 0.66 |" in per_block and "GKD" not in per_block  # GKD ran no per-block MoPe


def test_export_refuses_a_used_folder_and_fills_an_empty_one(tmp_path):
    run, used, empty = tmp_path / "run", tmp_path / "share", tmp_path / "empty"
    write_report(_results(), run)
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(used))} exists and is not an empty folder.*share-2"):
        export_run(run, used)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    empty.mkdir()
    paths = export_run(run, empty)
    exported = json.loads(paths["results"].read_text())
    assert "examples" not in exported and exported["redacted"]
    assert all(SECRET not in p.read_text(errors="replace") for p in empty.iterdir())
    assert SECRET in (run / "report.html").read_text()
    assert "examples" in json.loads((run / "results.json").read_text())  # the run folder is left as it was
    assert not list(tmp_path.glob(".*.tmp*"))


def test_report_command_names_the_used_folder(tmp_path, capsys):
    from kdfast.cli import main

    write_report(_results(), tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--export", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run'} exists and is not an empty folder" in capsys.readouterr().err


def test_report_command_redacts_or_exports(tmp_path, capsys):
    from kdfast.cli import main

    write_report(_results(), tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--redact"]) == 0
    out = capsys.readouterr().out
    assert "KD (small)" in out and f"Report: {tmp_path / 'run' / 'report.html'}" in out
    assert SECRET not in (tmp_path / "run" / "report.html").read_text()
    assert main(["report", str(tmp_path / "run"), "--export", str(tmp_path / "share")]) == 0
    assert f"Exported to {tmp_path / 'share'}: no record text" in capsys.readouterr().out
    assert SECRET not in (tmp_path / "share" / "report.html").read_text()
