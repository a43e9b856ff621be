"""A rerun in the same --out after a setting change reads the stages that ran, never a stale one."""
import json

from kdfast.audit import load_config
from kdfast.audit.pipeline import run_audit

SMALL = {"students": {"techniques": ["kd"], "control": False, "epochs": 1},
         "data": {"limit": 160, "n_members": 32, "n_public": 32}, "teacher": {"epochs": 2},
         "attacks": {"attacks": ["loss"], "mope_block": False, "bootstrap": 0, "n_records": 24},
         "memorization": {"n_records": 16}, "ablations": {"teacher_topk": []}}


def _run(out, lr):
    cfg = load_config(preset_name="tiny", overrides={**SMALL, "students": {**SMALL["students"], "lr": lr}})
    run_audit(cfg, out, progress=False)
    return json.loads((out / "results.json").read_text())


def test_rerun_after_a_setting_change_matches_a_fresh_folder(tmp_path):
    before = _run(tmp_path / "same", 3e-3)
    rerun = _run(tmp_path / "same", 1e-2)
    fresh = _run(tmp_path / "fresh", 1e-2)
    assert "teacher" in rerun["stages"]["reused"] and "attacks-small-kd" in rerun["stages"]["ran"]
    student = "small/kd"
    assert rerun["agreement"][student] != before["agreement"][student]  # the change reaches the agreement table
    assert rerun["agreement"] == fresh["agreement"]
    assert [m["auc"] for m in rerun["models"]] == [m["auc"] for m in fresh["models"]]


def test_fewer_attack_and_memorization_records_than_asked_are_said(tmp_path, capsys):
    from kdfast.audit.pipeline import Audit

    cfg = load_config(preset_name="tiny", overrides={**SMALL, "attacks": {**SMALL["attacks"], "n_records": 500},
                                                     "memorization": {"n_records": 900}})
    audit = Audit(cfg, tmp_path, progress=True)
    audit.data()
    out = capsys.readouterr().out
    n = len(audit.members)
    assert n < 500
    assert f"attacks.n_records=500 asked, {n} used" in out
    assert f"memorization.n_records=900 asked, {n} used" in out
