"""The degenerate-model rule on hand-made generations, against counts written out by hand."""
import math

import pytest

from kdfast.audit.degeneracy import (
    DegeneracyRule,
    assess,
    degeneracy_reasons,
    distinct_n,
    empty_rate,
    repeated_ngram_rate,
)

NORMAL = ["a small domesticated carnivorous mammal with soft fur", "the act of moving quickly on foot",
          "a building where people live", "relating to or near the sea", "an edible fruit with red skin",
          "a device that measures the temperature of the air"]
LOOPS = ['the the "The "The "The "The "The "The "The "The', "-- -- -- -- -- -- -- -- -- --",
         "d. the 111. d. the 111. d. the 111. d. the 111.", "a a a a a a a a a"]
EMPTY = ["", "   ", "...", "\n", "a building where people live", ""]


def test_repeated_ngram_rate_counts_repeats_within_each_generation():
    # "x y z w x y z w": 5 four-grams, 4 distinct -> 1/5 repeated; "a b c": no 4-gram -> 0
    assert repeated_ngram_rate(["x y z w x y z w", "a b c"], 4) == pytest.approx((1 / 5 + 0) / 2)
    assert repeated_ngram_rate(NORMAL) == 0.0
    assert repeated_ngram_rate(["-- -- -- -- -- -- -- --"]) == pytest.approx(1 - 1 / 5)  # punctuation loops count


def test_distinct_2_pools_all_generations():
    # "a b a b" + "a b": bigrams ab ba ab ab -> 2 distinct of 4
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_n(["a", ""], 2) == 0.0
    assert distinct_n(NORMAL * 10) == pytest.approx(distinct_n(NORMAL) / 10)  # one answer for every prompt


def test_empty_rate_counts_answers_without_a_letter_or_digit():
    assert empty_rate(EMPTY) == pytest.approx(5 / 6)
    assert empty_rate(NORMAL) == 0.0


def test_the_rule_flags_loops_empty_answers_and_bad_cross_entropy_and_passes_normal_text():
    assert assess(NORMAL, cross_entropy=2.0, reference_cross_entropy=1.5)["degenerate"] is False
    loops = assess(LOOPS)
    assert loops["degenerate"] and any("repeat" in r for r in loops["reasons"])
    empty = assess(EMPTY)
    assert empty["degenerate"] and any("empty" in r for r in empty["reasons"])
    same = assess(["a building where people live"] * 50)
    assert same["degenerate"] and any("distinct-2" in r for r in same["reasons"])
    far = assess(NORMAL, cross_entropy=4.0, reference_cross_entropy=2.0)
    assert far["degenerate"] and any("cross-entropy" in r for r in far["reasons"])
    assert assess(NORMAL, cross_entropy=math.nan)["degenerate"]
    assert assess(NORMAL, cross_entropy=9.0)["degenerate"] is False  # no teacher to compare with: not judged


def test_thresholds_are_the_rule_s_and_strict():
    rule = DegeneracyRule()
    at_limit = {"empty_rate": rule.max_empty, "repeated_4gram": rule.max_repeated_4gram,
                "distinct_2": rule.min_distinct_2, "cross_entropy": 1.0 + rule.max_excess_cross_entropy}
    assert degeneracy_reasons(at_limit, reference_cross_entropy=1.0) == []
    strict = DegeneracyRule(max_repeated_4gram=0.0)
    assert degeneracy_reasons({**at_limit, "repeated_4gram": 0.01}, 1.0, strict)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no generations"):
        empty_rate([])
    with pytest.raises(TypeError, match="list of generations"):
        repeated_ngram_rate("the the the the")


def _model(label: str, generations: list[str], auc: float, ce: float) -> dict:
    health = assess(generations, cross_entropy=ce, reference_cross_entropy=2.0)
    return {"id": label, "role": "student", "label": label, "technique": "kd", "size": "small",
            "auc": {"loss": auc}, "auc_ci95": {"loss": [auc - 0.05, auc + 0.05]}, "tpr_at_fpr": {"loss": {}},
            "roc": {"loss": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}},
            "memorization": {"member": 0.1, "nonmember": 0.05, "gap": 0.05}, "utility": {"rouge_l": 0.3},
            "mope_block": None, "health": health}


def test_report_greys_out_a_broken_model_only(tmp_path):
    from kdfast.audit.report import write_report

    results = {"name": "hand-made", "attacks": ["loss"], "split": {"private": 6, "public": 6, "nonmembers": 6},
               "machine": "test", "time_seconds": 1.0, "ablations": {}, "redacted": True,
               "degeneracy_rule": {"max_empty": 0.5, "max_repeated_4gram": 0.3, "min_distinct_2": 0.2,
                                   "max_excess_cross_entropy": 1.5},
               "models": [_model("Working KD", NORMAL, 0.61, 2.5), _model("Broken MiniLLM", LOOPS, 0.47, 2.4)]}
    paths = write_report(results, tmp_path)
    page = paths["report"].read_text()
    grey_rows = page.split("<tr class='degenerate'>")[1:]
    assert len(grey_rows) == 2 and all("Broken MiniLLM" in r.split("</tr>")[0] for r in grey_rows)  # AUC + health
    assert "Working KD" not in "".join(r.split("</tr>")[0] for r in grey_rows)
    assert "No finding is stated about Broken MiniLLM:" in page and "Working KD:" not in page
    summary = paths["summary"].read_text()
    assert "| Broken MiniLLM | ~~0.47~~ | degenerate: its answers repeat themselves" in summary
    assert "| Working KD | 0.61 | yes |" in summary
    assert paths["heatmap"].stat().st_size > 0
