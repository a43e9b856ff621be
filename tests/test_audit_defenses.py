"""The defenses on the tiny preset: every defense a student, one results entry each, the frontier chart embedded."""
import json
from html.parser import HTMLParser

import pytest

from kdfast.audit.config import ConfigError, load_config, preset
from kdfast.audit.defenses import defense_plan

pytestmark = pytest.mark.xdist_group("audit-defenses")

DEFENSES = {"init": ["low_risk", "high_risk"], "dp": {"epsilon": 8.0, "physical_batch_size": 16}, "temperature": [4.0],
            "risk_records": 16}


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.alts = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.alts.append(dict(attrs).get("alt"))


def _tiny(**defenses):
    return load_config(preset_name="tiny", overrides={"students": {"techniques": ["kd"]},
                                                      "attacks": {"attacks": ["loss", "zlib", "mope"]},
                                                      "ablations": {"teacher_topk": []}, "defenses": defenses})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from kdfast.audit.pipeline import run_audit

    out = tmp_path_factory.mktemp("defenses") / "run"
    return run_audit(_tiny(**DEFENSES), out, progress=False), out


def test_one_entry_per_defense_with_auc_tpr_and_rouge(run):
    out = run[1]
    saved = json.loads((out / "results.json").read_text())
    rows = saved["defenses"]
    kinds = [(r["defense"], r["value"], r["role"]) for r in rows]
    assert kinds == [("none", None, "student"), ("none", None, "teacher"), ("init", "low_risk", "defense"),
                     ("init", "high_risk", "defense"), ("dp", 8.0, "defense"), ("temperature", 4.0, "defense"),
                     ("dp", 8.0, "teacher")]
    by_id = {m["id"]: m for m in saved["models"]}
    for r in rows:
        model = by_id[r["model_id"]]
        assert r["auc"] == max(v for v in model["auc"].values() if v is not None) == model["auc"][r["attack"]]
        assert r["tpr_at_1pct_fpr"] == model["tpr_at_fpr"][r["attack"]]["0.01"]
        assert r["rouge_l"] == model["utility"]["rouge_l"] and 0 <= r["rouge_l"] <= 1
    dp_rows = [r for r in rows if r["defense"] == "dp"]
    assert all(0 < r["epsilon"] <= 8.0 * 1.02 for r in dp_rows)  # the student keeps its teacher's ε
    assert by_id["teacher-dp"]["dp"]["steps"] > 0 and by_id["teacher"]["dp"] is None
    # every model is a frontier point
    assert {p["id"] for p in saved["frontier"]} == set(by_id)


def test_risk_rules_pick_the_blocks_the_teacher_risk_ranks(run):
    results = run[0]
    auc = {int(b): v for b, v in results["teacher_risk"]["auc"].items()}
    leak = {b: abs(v - 0.5) for b, v in auc.items()}
    blocks = {m["id"]: m["blocks"] for m in results["models"]}
    assert blocks["small/kd"] == [0]  # the tiny preset's listed block
    assert blocks["small/kd-low_risk"] == [min(leak, key=lambda b: (leak[b], b))]
    assert blocks["small/kd-high_risk"] == [max(leak, key=lambda b: (leak[b], -b))]
    assert "risk-teacher" in results["stages"]["ran"]


def test_frontier_chart_exists_and_is_embedded_with_its_tables(run):
    _, out = run
    assert (out / "frontier.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    images = _Images()
    images.feed(page)
    assert "frontier" in images.alts and "Privacy–utility frontier" in page
    summary = (out / "summary.md").read_text()
    assert "## Privacy–utility frontier" in summary and "## Defenses" in summary
    assert "KD from DP teacher ε=8 (small)" in summary and "TPR@1%FPR" in summary


def test_defense_settings_are_checked_before_any_work():
    assert [sid for sid, *_ in defense_plan(_tiny(**DEFENSES))] == [
        "small/kd-low_risk", "small/kd-high_risk", "small/kd-dp", "small/kd-t4"]
    assert defense_plan(preset("tiny")) == []
    with pytest.raises(ConfigError, match="unknown value 'lowrisk'.*did you mean 'low_risk'"):
        _tiny(init=["lowrisk"])
    with pytest.raises(ConfigError, match="unknown config key 'defenses.dp.epsilonn'"):
        _tiny(dp={"epsilonn": 8})
    with pytest.raises(ConfigError, match="defenses.technique 'gkd' must also be in students.techniques"):
        _tiny(technique="gkd", init=["low_risk"])
    with pytest.raises(ConfigError, match="teacher.dp: epsilon must be > 0"):
        load_config(preset_name="tiny", overrides={"teacher": {"dp": {"epsilon": -1}}})
    with pytest.raises(ConfigError, match="students.init: unknown value 'random'"):
        load_config(preset_name="tiny", overrides={"students": {"init": "random"}})
    with pytest.raises(ConfigError, match="DP-SGD cannot run on OPT"):
        load_config(preset_name="tiny", overrides={"teacher": {"model": "tiny:opt"}, "defenses": {"dp": {}}})
    cfg = preset("defenses")
    assert cfg.students.techniques == ["kd"] and cfg.defenses.dp["epsilon"] == 8.0 and cfg.teacher.model == "smollm2"
    assert cfg.ablations.teacher_topk == [1, 8, 64]  # logit release: top-k on the same frontier
