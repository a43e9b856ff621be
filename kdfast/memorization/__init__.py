"""Memorization (docs/design.md §6): the study's greedy match accuracy, one-pass exact extraction, teacher-conditioned
memorization, and how far membership and memorization flags agree."""
from kdfast.memorization.agreement import DEFAULT_TAUS, Agreement, Conditioned, agreement, flag, teacher_conditioned
from kdfast.memorization.extraction import Extraction, check_fits, extractable, extraction, extraction_pairs
from kdfast.memorization.match import MatchResult, edit_distance, fit_prompts, match_accuracy, normalized_edit_distance
from kdfast.memorization.measure import measure, prompts_cut, results
from kdfast.memorization.run import MemorizeRun, format_summary, run_memorize
from kdfast.memorization.summary import group_summary

__all__ = [
    "DEFAULT_TAUS", "Agreement", "Conditioned", "agreement", "flag", "teacher_conditioned",
    "Extraction", "check_fits", "extractable", "extraction", "extraction_pairs",
    "MatchResult", "edit_distance", "fit_prompts", "match_accuracy", "normalized_edit_distance",
    "measure", "prompts_cut", "results",
    "group_summary", "MemorizeRun", "run_memorize", "format_summary",
]
