"""`kdfast audit --preset tiny` end to end: killed mid-students then resumed, every artifact, escaping, redaction."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from kdfast.audit.config import TECHNIQUES
from kdfast.data.records import bundled_records

SCRIPT = "<script>alert(1)</script>"
pytestmark = pytest.mark.xdist_group("audit")  # one worker runs the shared audit once (make test: --dist loadgroup)


class _Cells(HTMLParser):
    """Collects the text of every table cell; a page that does not parse raises."""

    def __init__(self):
        super().__init__()
        self.cells, self._in_cell, self.images = [], False, 0

    def handle_starttag(self, tag, attrs):
        self._in_cell = tag in ("td", "th")
        self.images += tag == "img"

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


ENV = dict(os.environ, TOKENIZERS_PARALLELISM="false")


def _audit(args, **kw):
    env = dict(ENV, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "kdfast", "audit", "--preset", "tiny", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny audit killed after its first distilled student, then resumed to the end (the shared run of this file)."""
    root = tmp_path_factory.mktemp("audit")
    data = root / "records.jsonl.gz"
    records = [dict(r, response=f"{r['response']} {SCRIPT}") for r in bundled_records()[:400]]
    data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    args = ["--out", str(root / "run"), "--set", f"data.source={data}", "--set", "data.limit=null"]
    first = _audit(args, start_new_session=True)
    log = []
    for line in first.stdout:
        log.append(line)
        if "student-small-kd: done" in line:
            os.killpg(first.pid, signal.SIGKILL)
            break
    first.wait()
    assert any("student-small-kd: done" in line for line in log), "".join(log[-30:])
    started = time.time()
    second = subprocess.run([sys.executable, "-m", "kdfast", "audit", "--preset", "tiny", *args], text=True,
                            capture_output=True, env=ENV)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"out": root / "run", "args": args, "stdout": second.stdout, "seconds": time.time() - started}


def test_resume_skips_finished_stages(run):
    results = json.loads((run["out"] / "results.json").read_text())
    reused, ran = results["stages"]["reused"], results["stages"]["ran"]
    assert {"data", "teacher", "student-small-sft", "student-small-kd"} <= set(reused)
    assert "student-small-seqkd" in ran and "teacher" not in ran


def test_every_artifact_and_every_auc(run):
    out = run["out"]
    for name in ("report.html", "results.json", "summary.md", "heatmap_auc.png", "roc.png", "memorization.png",
                 "per_block_auc.png", "utility_vs_leakage.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    by_technique = {m["technique"]: m for m in results["models"] if m["role"] in ("student", "control")}
    assert set(by_technique) == {"sft", *TECHNIQUES}
    expected = {"loss", "zlib", "lowercase", "min_k@0.2", "min_k_pp@0.2", "ref_base", "ref_second", "mope"}
    assert expected <= set(results["attacks"])
    for model in results["models"]:
        for attack in results["attacks"]:
            assert 0.0 <= model["auc"][attack] <= 1.0, (model["id"], attack)
        assert 0.0 <= model["memorization"]["member"] <= 1.0 and 0.0 <= model["utility"]["rouge_l"] <= 1.0
    assert all(m["mope_block"] for m in results["models"] if m["role"] != "teacher")
    assert "AUC by model and attack" in (out / "summary.md").read_text()
    # rmia / lira: the teacher against base + ref_second, students against base + two SFT reference controls
    assert {"rmia", "lira"} <= set(results["attacks"])
    stages = set(results["stages"]["ran"]) | set(results["stages"]["reused"])
    assert {"calibration-base", "calibration-second", "calibration-sft1", "calibration-sft2",
            "student-small-sft-ref0", "student-small-sft-ref1"} <= stages
    for model in results["models"]:
        cal = model["calibrated"]["rmia"]["at_fpr"]["0.01"]
        assert 0 <= cal["tpr"] <= 1 and 0 <= cal["fpr"] <= 1 and model["calibrated"]["rmia"]["n_heldout"] > 0
    summary = (out / "summary.md").read_text()
    assert "TPR at 1% FPR" in summary and "rmia" in summary and "lira" in summary
    assert "Report:" in run["stdout"] and "Teacher" in run["stdout"]


def test_teacher_topk_ablation_one_student_per_k_from_its_cache(run):
    """ablations.teacher_topk (tiny: [1, 8]): one KD student per k, trained from a cache captured once per k, its
    leakage and utility in results.json, summary.md and the report beside the full-logit KD student's."""
    results = json.loads((run["out"] / "results.json").read_text())
    entries = results["ablations"]["teacher_topk"]
    assert [e["value"] for e in entries] == [1, 8]
    by_id = {m["id"]: m for m in results["models"]}
    for e in entries:
        model = by_id[e["model_id"]]
        assert model["role"] == "ablation" and model["technique"] == "kd" and model["size"] == "small"
        assert e["auc"] == model["auc"] and 0 <= e["auc"]["loss"] <= 1 and 0 <= e["rouge_l"] <= 1
        assert e["tpr_at_1pct_fpr"]["loss"] == model["tpr_at_fpr"]["loss"]["0.01"]
        cache = next(run["out"].glob(f"stages/teacher-cache-k{e['value']}-*/cache/manifest.json"))
        assert json.loads(cache.read_text())["k"] == e["value"]
    stages = results["stages"]["ran"] + results["stages"]["reused"]
    assert stages.count("teacher-cache-k1") == stages.count("teacher-cache-k8") == 1
    summary = (run["out"] / "summary.md").read_text()
    assert "Ablations: leakage and utility" in summary and "all logits" in summary
    assert all(by_id[e["model_id"]]["label"] in summary for e in entries)
    assert (run["out"] / "ablations.png").stat().st_size > 0


def test_html_parses_shows_the_aucs_and_escapes_records(run):
    page = (run["out"] / "report.html").read_text()
    parser = _Cells()
    parser.feed(page)
    results = json.loads((run["out"] / "results.json").read_text())
    for model in results["models"]:
        assert model["label"] in parser.cells
        assert f"{model['auc']['loss']:.2f}" in parser.cells
    assert parser.images >= 4 and "http://" not in page and "https://" not in page
    assert SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def _record_texts(run_dir: Path) -> set[str]:
    """Every record text of the run's split and every generation the audit kept (strings of 20 characters or
    more: a shorter one could occur in a report by chance)."""
    import pandas as pd

    split = json.loads(next(run_dir.glob("stages/data-*/split.json")).read_text())
    texts = {v for part in split.values() for r in part for v in r.values() if isinstance(v, str)}
    for path in run_dir.glob("stages/memorization-*/records.parquet"):
        texts |= set(pd.read_parquet(path)["generated"].astype(str).str.strip())
    return {t for t in texts if len(t) >= 20}


def _leaked(files: list[Path], texts: set[str]) -> set[str]:
    """The texts found in any of the files, as written or as JSON, HTML or Markdown escape them; a parquet file
    is read cell by cell as well as byte by byte."""
    import html

    import pandas as pd

    from kdfast.audit.report import md_escape

    contents = []
    for path in files:
        contents.append(path.read_bytes().decode("utf-8", errors="replace"))
        if path.suffix == ".parquet":
            contents.append(pd.read_parquet(path).astype(str).to_string())
    blob = "\n".join(contents)
    forms = lambda t: {t, html.escape(t), html.escape(t, quote=False), json.dumps(t)[1:-1],  # noqa: E731
                       json.dumps(t, ensure_ascii=False)[1:-1], md_escape(t)}
    return {t for t in texts if any(f in blob for f in forms(t))}


def test_export_holds_no_record_text_and_every_auc(run, tmp_path):
    texts = _record_texts(run["out"])
    split = next(run["out"].glob("stages/data-*/split.json"))
    assert len(texts) > 200 and _leaked([split], texts)  # the scan finds record text where there is some
    share = tmp_path / "share"
    done = subprocess.run([sys.executable, "-m", "kdfast", "report", str(run["out"]), "--export", str(share)],
                          text=True, capture_output=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in share.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"report.html", "summary.md", "results.json", "heatmap_auc.png"}
    assert all(p.parent == share and p.suffix in (".html", ".md", ".json", ".png") for p in files), files
    assert not _leaked(files, texts)
    results = json.loads((run["out"] / "results.json").read_text())
    exported = json.loads((share / "results.json").read_text())
    assert [m["auc"] for m in exported["models"]] == [m["auc"] for m in results["models"]]
    parser = _Cells()
    parser.feed((share / "report.html").read_text())
    summary = (share / "summary.md").read_text()
    for model in results["models"]:
        assert f"{model['auc']['loss']:.2f}" in parser.cells and f"{model['auc']['loss']:.2f}" in summary


def test_redact_shows_no_record_text(run):
    done = subprocess.run([sys.executable, "-m", "kdfast", "audit", "--preset", "tiny", *run["args"], "--redact",
                           "--quiet"], text=True, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (run["out"] / "report.html").read_text()
    assert "alert(1)" not in page and "Redacted" in page
    results = json.loads((run["out"] / "results.json").read_text())
    assert "examples" not in results and results["redacted"]
    assert "alert" not in json.dumps(results)


def test_report_command_rewrites_redacted(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy, ignore=shutil.ignore_patterns("stages"))
    done = subprocess.run([sys.executable, "-m", "kdfast", "report", str(copy), "--redact"], text=True,
                          capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "alert(1)" not in (copy / "report.html").read_text() and "Teacher" in done.stdout


def test_cli_lists_every_command():
    from kdfast.cli import COMMANDS, build_parser

    for name in COMMANDS:
        build_parser(name)  # imports the command's module and its arguments
    done = subprocess.run([sys.executable, "-m", "kdfast", "--help"], text=True, capture_output=True)
    assert done.returncode == 0 and all(name in done.stdout for name in COMMANDS)


def test_degenerate_models_are_flagged_and_greyed(run):
    """The tiny preset's random-init models answer in loops or one phrase for every prompt: the rule flags
    them, and the report greys out exactly the flagged rows and withholds findings about them."""
    results = json.loads((run["out"] / "results.json").read_text())
    flagged = [m for m in results["models"] if m["health"]["degenerate"]]
    assert flagged and all(m["health"]["reasons"] for m in flagged)
    base_ce = results["degeneracy_rule"]["base_cross_entropy"]  # the reference: the pretrained base's
    assert np.isfinite(base_ce) and base_ce > 0
    for m in results["models"]:
        assert {"empty_rate", "repeated_4gram", "distinct_2", "cross_entropy"} <= set(m["health"])
        excess = m["health"]["cross_entropy"] - base_ce > results["degeneracy_rule"]["max_excess_cross_entropy"]
        assert excess == any("above the pretrained base's" in r for r in m["health"]["reasons"])
    page = (run["out"] / "report.html").read_text()
    assert page.count("<tr class='degenerate'>") == 2 * len(flagged)  # the AUC table and the health table
    assert "No finding is stated about" in page and flagged[0]["label"] in page
    assert "~~" in (run["out"] / "summary.md").read_text()


def test_attack_and_memorization_stages_cut_long_records_to_the_models_positions(tmp_path):
    """A GPT-2-family model on a record far past its positions: both stages cut it, log it and record the count."""
    from kdfast import models
    from kdfast.audit import load_config
    from kdfast.audit.pipeline import Audit, ModelEntry

    folder = tmp_path / "gpt2"
    models.tiny_model("gpt2", max_positions=128).save_pretrained(folder)
    models.tiny_tokenizer().save_pretrained(folder)
    cfg = load_config(preset_name="tiny", overrides={"attacks": {"attacks": ["loss"], "bootstrap": 0},
                                                     "memorization": {"n_tokens": 8}})
    audit, log = Audit(cfg, tmp_path / "out", progress=False), []
    audit.log = log.append
    records = bundled_records()[:8]
    audit.members = [{**records[0], "instruction": "long " * 20000}, *records[1:4]]
    audit.nonmembers, audit.n_mem = records[4:], 4
    audit.digest = {"attack": "test"}
    entry = ModelEntry("small/kd", "student", "KD (small)", str(folder), "key")
    audit.attack(entry, {})
    audit.memorize(entry)
    assert audit.cut["small/kd"] == {"attacks": 1, "memorization": 1}
    assert any("attacks small/kd: 1 of 8 records cut to 128 tokens (the model's positions)" in line for line in log)
    assert any("memorization small/kd: 1 of 8 records cut to 128 tokens" in line for line in log)
