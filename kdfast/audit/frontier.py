"""The privacy–utility frontier: every audited model with a utility and a leakage as one point, its chart and tables."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LOW_FPR = "0.01"
MARKERS = {"teacher": ("*", "tab:red"), "control": ("s", "tab:gray"), "student": ("o", "tab:blue"),
           "ablation": ("^", "tab:purple"), "defense": ("D", "tab:green")}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def strongest_attack(model: dict) -> str | None:
    """The attack of highest AUC on this model (ties: the first listed); None when it has no AUC."""
    scored = [(a, v) for a, v in model.get("auc", {}).items() if _finite(v)]
    return max(scored, key=lambda av: av[1])[0] if scored else None


def frontier_points(models: list[dict]) -> list[dict]:
    """One point per model with a ROUGE-L and an AUC (results["models"] entries, any role: student, ablation,
    defense, control, teacher): id, label, role, rouge_l, the strongest attack, its AUC, 95% CI and TPR at 1% FPR."""
    points = []
    for m in models:
        rouge, attack = m.get("utility", {}).get("rouge_l"), strongest_attack(m)
        if not _finite(rouge) or attack is None:
            continue
        points.append({"id": m["id"], "label": m["label"], "role": m["role"], "rouge_l": float(rouge), "attack": attack,
                       "auc": float(m["auc"][attack]), "auc_ci95": m.get("auc_ci95", {}).get(attack),
                       "tpr_at_1pct_fpr": m.get("tpr_at_fpr", {}).get(attack, {}).get(LOW_FPR)})
    return points


def plot_frontier(points: list[dict], path: Path) -> Path | None:
    """Two panels over ROUGE-L: the strongest attack's AUC and its TPR at 1% FPR; the teacher and control marked."""
    from kdfast.audit.report import _save

    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, ylabel, chance in ((axes[0], "auc", "AUC of the strongest attack", 0.5),
                                    (axes[1], "tpr_at_1pct_fpr", "TPR at 1% FPR (strongest attack)", 0.01)):
        for role, (marker, color) in MARKERS.items():
            mine = [p for p in points if p["role"] == role and _finite(p[key])]
            if mine:
                ax.scatter([p["rouge_l"] for p in mine], [p[key] for p in mine], marker=marker, color=color,
                           s=110 if role in ("teacher", "control") else 45, label=role, zorder=3)
        for p in points:
            if _finite(p[key]):
                ax.annotate(p["label"], (p["rouge_l"], p[key]), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
        ax.axhline(chance, color="k", ls=":", lw=0.8)
        ax.set(xlabel="utility: ROUGE-L (stemmed) on held-out prompts", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Privacy–utility frontier: lower and further right is better")
    return _save(fig, path)


def frontier_table(points: list[dict], defenses: list[dict] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and lines: each point's role, ROUGE-L, strongest attack, AUC [CI], TPR@1%FPR, and ε where DP."""
    from kdfast.audit.report import _fmt

    eps = {d["model_id"]: d.get("epsilon") for d in defenses or []}
    header = ["model", "role", "ROUGE-L", "strongest attack", "AUC", "95% CI", "TPR@1%FPR", "ε (DP)"]
    lines = []
    for p in sorted(points, key=lambda p: -p["rouge_l"]):
        ci = p.get("auc_ci95")
        lines.append([p["label"], p["role"], _fmt(p["rouge_l"], 3), p["attack"], _fmt(p["auc"]),
                     f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–", _fmt(p["tpr_at_1pct_fpr"], 3),
                     _fmt(eps.get(p["id"]))])
    return header, lines


def defense_lines(defenses: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and lines of results["defenses"]: the defense and value beside the same figures."""
    from kdfast.audit.report import _fmt

    header = ["defense", "value", "model", "ROUGE-L", "AUC", "TPR@1%FPR", "strongest attack", "ε (DP)"]
    lines = [[d["defense"], "–" if d["value"] is None else str(d["value"]), d["label"], _fmt(d["rouge_l"], 3),
             _fmt(d["auc"]), _fmt(d["tpr_at_1pct_fpr"], 3), d["attack"], _fmt(d.get("epsilon"))] for d in defenses]
    return header, lines
