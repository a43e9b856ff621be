"""Attack metrics against scikit-learn: AUC, TPR at FPR ≤ x at the edges, bootstrap CI, ROC PNG."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kdfast.attacks import evaluate, format_results, plot_roc, roc_metrics, tpr_at_fpr
from kdfast.attacks.metrics import auc_rows, bootstrap_auc_ci


def test_auc_matches_sklearn_with_ties_and_inverted_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes ties
    r = roc_metrics(labels, scores, n_bootstrap=0)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_metrics(labels, -scores, n_bootstrap=0)["auc"] == pytest.approx(1 - r["auc"])  # raw, below 0.5 kept
    rows = rng.normal(size=(5, 40))
    truth = rng.integers(0, 2, (5, 40)).astype(bool)
    truth[:, 0], truth[:, 1] = True, False
    assert np.allclose(auc_rows(truth, rows), [roc_auc_score(t, s) for t, s in zip(truth, rows)])


def test_tpr_at_fpr_conventions():
    # 4 non-members at 0.1..0.4, 4 members at 0.35, 0.5, 0.6, 0.05
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.6, 0.05])
    t = roc_metrics(labels, scores, n_bootstrap=0, fprs=(0.0, 0.2, 0.25, 0.5, 1.0))["tpr_at_fpr"]
    assert t["0"] == 0.5 and t["0.2"] == 0.5  # thresholds above 0.4: two members, no false positive
    assert t["0.25"] == 0.75  # FPR = 0.25 exactly is admitted (≤): threshold 0.35 gives a third member
    assert t["0.5"] == 0.75 and t["1"] == 1.0
    perfect = roc_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_bootstrap=0, fprs=(0.0, 0.001))["tpr_at_fpr"]
    assert perfect == {"0": 1.0, "0.001": 1.0}
    fpr, tpr = np.array([0.0, 0.0, 0.01, 0.02, 1.0]), np.array([0.0, 0.3, 0.4, 0.6, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.4 and tpr_at_fpr(fpr, tpr, 0.0099) == 0.3 and tpr_at_fpr(fpr, tpr, 0) == 0.3


def test_bootstrap_ci_is_seeded_and_covers_the_auc():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(100), np.zeros(100)]
    scores = rng.normal(labels * 0.8, 1.0)
    a, b = bootstrap_auc_ci(labels, scores, 500, seed=3), bootstrap_auc_ci(labels, scores, 500, seed=3)
    assert a == b and a != bootstrap_auc_ci(labels, scores, 500, seed=4)
    auc = roc_auc_score(labels, scores)
    assert a[0] < auc < a[1] and 0.05 < a[1] - a[0] < 0.25


def test_evaluate_table_skips_nan_and_plots(tmp_path):
    table = pd.DataFrame({"id": range(6), "member": [1, 1, 1, 0, 0, 0], "n_tokens": [3] * 6,
                          "loss": [-1, -2, -3, -4, -5, -6.0], "recall": [np.nan, 2, 3, 1, 0, np.nan],
                          "mope_block@0": [1, 0, 1, 0, 1, 0.0], "mope_block@1": [3, 2, 1, 0, 1, 0.0]})
    results = evaluate(table, n_bootstrap=50)
    assert set(results) == {"loss", "recall", "mope_block@0", "mope_block@1"}
    assert results["loss"]["auc"] == 1.0 and results["recall"]["n_members"] == 2
    assert results["recall"]["n_nonmembers"] == 2
    text = format_results(results)
    assert "loss" in text and "1.000" in text
    path = plot_roc(results, tmp_path / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no member column"):
        evaluate(table.drop(columns="member"))
    with pytest.raises(ValueError, match="members and non-members"):
        roc_metrics([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="one label per row"):
        evaluate(table, membership=[1, 0])


def test_non_finite_scores_are_counted_and_printed():
    """NaN and ±inf are left out of every figure, and each column says how many (±inf used to vanish unseen)."""
    inf = np.inf
    table = pd.DataFrame({"member": [1, 1, 1, 1, 0, 0, 0, 0],
                          "loss": [4, 3, inf, 2, 1, 0, -inf, -1.0], "zlib": [np.nan, 2, 3, 1, 0, 2, np.nan, inf],
                          "min_k@0.2": np.arange(8.0)})
    results = evaluate(table, n_bootstrap=20, calibration=0.5)
    assert results["loss"]["left_out"] == {"nan": 0, "inf": 2}
    assert results["zlib"]["left_out"] == {"nan": 2, "inf": 1}
    assert results["min_k@0.2"]["left_out"] == {"nan": 0, "inf": 0}
    assert (results["loss"]["n_members"], results["loss"]["n_nonmembers"]) == (3, 3)
    assert results["loss"]["auc"] == roc_auc_score([1, 1, 1, 0, 0, 0], [4, 3, 2, 1, 0, -1])
    assert results["zlib"]["calibrated"]["n_calibration"] + results["zlib"]["calibrated"]["n_heldout"] == 2
    assert format_results(results).splitlines()[-1] == \
        "left out (non-finite scores): loss: 2 ±inf; zlib: 2 NaN, 1 ±inf"
    assert "left out" not in format_results({"min_k@0.2": results["min_k@0.2"]})
