"""Membership-inference attacks (docs/design.md §5) scored in bulk, their metrics, and ROC curves."""
from kdfast.attacks.bulk import records_cut
from kdfast.attacks.metrics import (
    calibrated_thresholds,
    evaluate,
    format_results,
    left_out_text,
    plot_roc,
    roc_metrics,
    tpr_at_fpr,
    with_percentiles,
)
from kdfast.attacks.ref import reference_scores
from kdfast.attacks.scoring import ATTACKS, DEFAULT_ATTACKS, AttackConfig, score

__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "AttackConfig", "score", "evaluate", "format_results", "plot_roc",
           "roc_metrics", "tpr_at_fpr", "reference_scores", "calibrated_thresholds", "with_percentiles",
           "records_cut", "left_out_text"]
