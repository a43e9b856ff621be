"""Membership-inference attacks (docs/design.md §5) scored in bulk, their metrics, and ROC curves."""
from kdfast.attacks.metrics import evaluate, format_results, plot_roc, roc_metrics, tpr_at_fpr
from kdfast.attacks.ref import reference_scores
from kdfast.attacks.scoring import ATTACKS, DEFAULT_ATTACKS, AttackConfig, score

__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "AttackConfig", "score", "evaluate", "format_results", "plot_roc",
           "roc_metrics", "tpr_at_fpr", "reference_scores"]
