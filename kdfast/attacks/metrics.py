"""Membership-inference metrics (docs/design.md §5): ROC AUC with a bootstrap 95% CI, TPR at FPR ≤ x, ROC curves as PNG.

scikit-learn and scipy are imported where used: scoring (and the GPU benchmark) must not need them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdfast.io import atomic_path

FPRS = (0.25, 0.05, 0.01, 0.001, 0.0)
CALIBRATED_FPRS = (0.1, 0.01, 0.001)
META_COLUMNS = ("id", "member", "category", "n_tokens")
PERCENTILE_PREFIX = "pct_"


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, x: float) -> float:
    """The highest TPR of a ROC curve among its points with FPR ≤ x (x = 0: TPR with no false positive at all)."""
    return float(tpr[fpr <= x + 1e-12].max())


def auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of [R, n] labels (bool) and scores at once (Mann–Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    pos = labels.sum(1)
    neg = labels.shape[1] - pos
    return ((ranks * labels).sum(1) - pos * (pos + 1) / 2) / (pos * neg)


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC; members and non-members are resampled separately (counts kept)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    aucs = []
    for start in range(0, n_bootstrap, 200):
        r = min(200, n_bootstrap - start)
        sample = np.concatenate([rng.choice(pos, (r, pos.size)), rng.choice(neg, (r, neg.size))], axis=1)
        truth = np.concatenate([np.ones((r, pos.size), bool), np.zeros((r, neg.size), bool)], axis=1)
        aucs.append(auc_rows(truth, sample))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.concatenate(aucs), [tail, 100 - tail])
    return float(lo), float(hi)


def roc_metrics(labels, scores, n_bootstrap: int = 1000, seed: int = 0, fprs=FPRS) -> dict:
    """auc (raw: below 0.5 means the score is inverted for this model), auc_ci95, tpr_at_fpr {x: TPR at FPR ≤ x},
    roc {fpr, tpr}, n_members, n_nonmembers, left_out. labels: 1 = member.

    Non-finite scores are left out of every figure: NaN (a record the attack did not score, e.g. ReCaLL's prefix
    records) and ±inf (a score that overflowed); left_out {"nan": n, "inf": n} counts them, so nothing is dropped
    unseen."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, scores = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    left_out = {"nan": int(np.isnan(scores).sum()), "inf": int(np.isinf(scores).sum())}
    keep = np.isfinite(scores)
    labels, scores = labels[keep], scores[keep]
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"ROC metrics need members and non-members; got {n_pos} members of {labels.size} "
                         "scored records")
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    short_fpr, short_tpr, _ = roc_curve(labels, scores)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "auc_ci95": list(bootstrap_auc_ci(labels, scores, n_bootstrap, seed)) if n_bootstrap else None,
        "tpr_at_fpr": {f"{x:g}": tpr_at_fpr(fpr, tpr, x) for x in fprs},
        "roc": {"fpr": short_fpr.tolist(), "tpr": short_tpr.tolist()},
        "n_members": n_pos,
        "n_nonmembers": int(labels.size - n_pos),
        "left_out": left_out,
    }


def score_columns(table) -> list[str]:
    """The attack score columns of a score() table."""
    return [c for c in table.columns if c not in META_COLUMNS and not c.startswith(PERCENTILE_PREFIX)]


def evaluate(table, membership=None, n_bootstrap: int = 1000, seed: int = 0,
             calibration: float | None = None) -> dict[str, dict]:
    """roc_metrics of every score column of a score() table; membership: 0/1 per row (default: its member column).

    calibration: the fraction of non-members on which thresholds are chosen (calibrated_thresholds, seeded by
    `seed`); each column's result then holds them under "calibrated". Each column's "left_out" counts its NaN and
    ±inf scores, which no figure includes (format_results prints them).
    """
    if membership is None:
        if "member" not in table.columns:
            raise ValueError("the table has no member column: pass membership=[0/1 per row] (1 = member)")
        membership = table["member"].to_numpy()
    membership = np.asarray(membership)
    if membership.shape != (len(table),):
        raise ValueError(f"membership needs one label per row ({len(table)} rows, got shape {membership.shape})")
    results = {c: roc_metrics(membership, table[c].to_numpy(), n_bootstrap, seed) for c in score_columns(table)}
    if calibration is not None:
        for c, r in results.items():
            r["calibrated"] = calibrated_thresholds(membership, table[c].to_numpy(), calibration, seed)
    return results


def calibration_split(n_nonmembers: int, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) positions among n non-members: a seeded permutation cut at round(fraction · n)."""
    if not 0 < fraction < 1:
        raise ValueError(f"calibration must be a fraction in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n_nonmembers)
    cut = round(fraction * n_nonmembers)
    if cut == 0 or cut == n_nonmembers:
        raise ValueError(f"calibration={fraction} leaves an empty half of {n_nonmembers} non-members; give more "
                         "non-members or a fraction nearer 0.5 (kdfast attack --calibration, the audit's "
                         "attacks.calibration)")
    return np.sort(order[:cut]), np.sort(order[cut:])


def calibrated_thresholds(labels, scores, fraction: float = 0.5, seed: int = 0, fprs=CALIBRATED_FPRS) -> dict:
    """Thresholds an auditor can quote: chosen on the calibration half of the non-members, measured on the rest.

    For each target FPR x, τ_x is the (k+1)-th highest calibration score with k = ⌊x · n_calibration⌋, and a
    record is called a member when its score > τ_x (so at most k calibration non-members are); reported are τ_x,
    the TPR over all members and the realized FPR on the held-out non-members. Non-finite scores are left out
    (roc_metrics counts them).
    Returns {"fraction", "seed", "n_calibration", "n_heldout", "at_fpr": {f"{x:g}": {"threshold", "tpr", "fpr"}}}.
    """
    labels, scores = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(scores)
    labels, scores = labels[keep], scores[keep]
    negatives, positives = scores[labels == 0], scores[labels == 1]
    cal, held = calibration_split(negatives.size, fraction, seed)
    ranked = np.sort(negatives[cal])[::-1]
    at = {}
    for x in fprs:
        k = math.floor(x * ranked.size + 1e-9)
        tau = float(ranked[k]) if k < ranked.size else -np.inf
        at[f"{x:g}"] = {"threshold": tau, "tpr": float((positives > tau).mean()) if positives.size else float("nan"),
                        "fpr": float((negatives[held] > tau).mean())}
    return {"fraction": fraction, "seed": seed, "n_calibration": int(cal.size), "n_heldout": int(held.size),
            "at_fpr": at}


def with_percentiles(table):
    """The table plus pct_<score> per score column: 100 × the fraction of non-member scores ≤ the record's score
    (per-record risk; NaN for a NaN score). Needs the member column."""
    member = table["member"].to_numpy().astype(bool)
    out = table.copy()
    for c in score_columns(table):
        values = table[c].to_numpy(dtype=np.float64)
        reference = np.sort(values[~member & np.isfinite(values)])
        with np.errstate(invalid="ignore"):
            pct = 100 * np.searchsorted(reference, values, side="right") / max(reference.size, 1)
        out[PERCENTILE_PREFIX + c] = np.where(np.isfinite(values) & (reference.size > 0), pct, np.nan)
    return out


def format_results(results: dict[str, dict]) -> str:
    """A plain-text table: attack, AUC, its 95% CI, TPR at 1% FPR, TPR at 0.1% FPR; with calibrated thresholds also
    the held-out TPR and realized FPR at the 1% threshold."""
    calibrated = all("calibrated" in r for r in results.values()) and bool(results)
    extra = f" {'cal TPR@1%':>10} {'(real FPR)':>10}" if calibrated else ""
    lines = [f"{'attack':<18} {'AUC':>6}  {'95% CI':<15} {'TPR@1%':>7} {'TPR@0.1%':>9}{extra}"]
    for name, r in results.items():
        ci = "{:.3f}–{:.3f}".format(*r["auc_ci95"]) if r["auc_ci95"] else "-"
        line = f"{name:<18} {r['auc']:>6.3f}  {ci:<15} {r['tpr_at_fpr']['0.01']:>7.3f} {r['tpr_at_fpr']['0.001']:>9.3f}"
        if calibrated:
            at = r["calibrated"]["at_fpr"]["0.01"]
            line += f" {at['tpr']:>10.3f} {at['fpr']:>10.3f}"
        lines.append(line)
    if left_out := left_out_text(results):
        lines.append(f"left out (non-finite scores): {left_out}")
    return "\n".join(lines)


def left_out_text(results: dict[str, dict]) -> str:
    """The scores left out of each column's figures, 'loss: 2 NaN, 1 ±inf; zlib: 1 NaN' ('' when none were)."""
    parts = []
    for name, r in results.items():
        counts = r.get("left_out") or {}  # results saved before the counts existed have none
        shown = [f"{counts[k]} {label}" for k, label in (("nan", "NaN"), ("inf", "±inf")) if counts.get(k)]
        if shown:
            parts.append(f"{name}: {', '.join(shown)}")
    return "; ".join(parts)


def plot_roc(results: dict[str, dict], path: str | Path, title: str = "Membership inference ROC") -> Path:
    """Save the ROC curves as a PNG: linear axes and log-log (the low-FPR regime). Of the mope_block@l curves
    only the block with the highest AUC is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = {k: v for k, v in results.items() if k.startswith("mope_block@")}
    shown = {k: v for k, v in results.items() if k not in blocks}
    if blocks:
        best = max(blocks, key=lambda k: blocks[k]["auc"])
        shown[f"{best} (best block)"] = blocks[best]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for name, r in shown.items():
        fpr, tpr = np.asarray(r["roc"]["fpr"]), np.asarray(r["roc"]["tpr"])
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{name} (AUC {r['auc']:.3f})", lw=1.3)
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
        ax.set(xscale=scale, yscale=scale, xlabel="false positive rate", ylabel="true positive rate")
        if scale == "log":
            ax.set(xlim=(1e-3, 1), ylim=(1e-3, 1))
        else:
            ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
