"""The audit's results dict (results.json) from its stages' outputs: per-model figures, teacher-conditioned
memorization, agreement, ablations, the frontier and defenses, and example outputs."""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kdfast import memorization
from kdfast.audit import defenses
from kdfast.audit.config import AuditConfig
from kdfast.audit.degeneracy import DegeneracyRule, degeneracy_reasons
from kdfast.audit.frontier import frontier_points

if TYPE_CHECKING:
    from kdfast.audit.pipeline import ModelEntry

SCORES_FILE = "scores.parquet"  # in an attack stage's folder: one row per attacked record, one column per attack
MEMORIZATION_FILE = "records.parquet"  # in a memorization stage's folder: one row per memorization record


@dataclass
class Evaluation:
    """What the per-model stages gave one audited model: the folders they wrote and their results."""

    metrics: dict  # attack column -> attacks.evaluate's metrics
    attack_folder: Path
    memorization: dict  # the memorization stage's result (member / non-member match accuracy, ROUGE-L, ...)
    memorization_folder: Path
    mope_block: dict | None  # perturbed block -> MoPe AUC, when it ran
    health: dict  # degeneracy_metrics

    def scores(self) -> pd.DataFrame:
        return pd.read_parquet(self.attack_folder / SCORES_FILE)

    def memorization_table(self) -> pd.DataFrame:
        return memorization_table(self.memorization_folder)


def memorization_table(folder: Path) -> pd.DataFrame:
    """The per-record table a memorization stage wrote in `folder`."""
    return pd.read_parquet(folder / MEMORIZATION_FILE)


def machine_name(device: torch.device) -> str:
    """The device's name as results.json reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def assemble(cfg: AuditConfig, entries: list[ModelEntry], evaluations: list[Evaluation], *,
             plan: list[tuple[str, str, str, str, dict]], members: list[dict], n_mem: int, split: dict,
             blocks_of: dict, privacy: dict, cut: dict, risk: dict | None, base_cross_entropy: float | None,
             stages: dict, machine: str, seconds: float) -> dict:
    """The results dict of a finished study.

    entries and evaluations: the audited models in order, the teacher among them. plan: Audit.student_plan.
    members: the attacked member records (the attack tables hold them first, then as many non-members);
    n_mem: the memorization records per side. blocks_of, privacy, cut: model id -> the teacher blocks a student
    kept, a DP model's spend, the records cut to the model's positions by stage. base_cross_entropy: the pretrained
    base's held-out cross-entropy, the degeneracy rule's reference. stages: {"ran", "reused"}.
    """
    columns = list(dict.fromkeys(c for ev in evaluations for c in ev.metrics))
    rule = DegeneracyRule()
    models = [_model(e, ev, degeneracy_reasons(ev.health, base_cross_entropy, rule),
                     blocks_of.get(e.id), privacy.get(e.id), cut.get(e.id)) for e, ev in zip(entries, evaluations)]
    frames = {e.id: ev.memorization_table() for e, ev in zip(entries, evaluations)}
    results = {
        "name": cfg.name, "config": cfg.to_dict(), "split": split, "attacks": columns,
        "models": models, "machine": machine, "time_seconds": seconds,
        "stages": stages,
        "teacher_conditioned": conditioned(entries, frames, n_mem, cfg.memorization.taus),
        "agreement": agreement(entries, [ev.scores() for ev in evaluations], frames, len(members), n_mem,
                               cfg.memorization.agreement_flag_rate),
        "ablations": ablations(plan, models),
        "frontier": frontier_points(models), "teacher_risk": risk,
        "degeneracy_rule": {**asdict(rule), "base_cross_entropy": base_cross_entropy},
        "redacted": cfg.redact,
    }
    results["defenses"] = defenses.defense_table(cfg, results["frontier"], privacy)
    if not cfg.redact:
        results["examples"] = examples(entries, frames, members, n_mem)
    return results


def _model(entry: ModelEntry, ev: Evaluation, reasons: list[str], blocks, dp: dict | None, cut: dict | None) -> dict:
    """One model's entry of results["models"]."""
    metrics = ev.metrics
    mem = {k: v for k, v in ev.memorization.items() if k not in ("_seconds", "rouge_l")}
    return {
        "id": entry.id, "role": entry.role, "label": entry.label, "technique": entry.technique,
        "size": entry.size,
        "auc": {c: m["auc"] for c, m in metrics.items()},
        "auc_ci95": {c: m["auc_ci95"] for c, m in metrics.items()},
        "tpr_at_fpr": {c: m["tpr_at_fpr"] for c, m in metrics.items()},
        "calibrated": {c: m.get("calibrated") for c, m in metrics.items()},
        "roc": {c: m["roc"] for c, m in metrics.items()},
        "left_out": {c: m.get("left_out") for c, m in metrics.items()},  # NaN / ±inf scores per column
        "memorization": mem, "utility": {"rouge_l": ev.memorization["rouge_l"]},
        "mope_block": ev.mope_block, "blocks": blocks,
        "dp": dp, "records_cut_to_max_len": cut,
        "health": {**ev.health, "degenerate": bool(reasons), "reasons": reasons},
    }


def conditioned(entries: list[ModelEntry], frames: dict[str, pd.DataFrame], n_mem: int,
                taus: list[float]) -> dict:
    """Model id -> teacher-conditioned memorization of each non-teacher on the member records, per τ."""
    teacher = frames["teacher"]["accuracy"].to_numpy()[:n_mem]
    return {e.id: [c.to_dict() for c in memorization.teacher_conditioned(
                teacher, frames[e.id]["accuracy"].to_numpy()[:n_mem], taus)]
            for e in entries if e.role != "teacher"}


def agreement(entries: list[ModelEntry], scores: list[pd.DataFrame], frames: dict[str, pd.DataFrame],
              n_members: int, n_mem: int, flag_rate: float) -> dict:
    """Model id -> agreement of the loss attack's flags and memorization's on the memorization records.

    scores: each model's attack table (n_members members, then the non-members); its first n_mem of each side
    are the memorization records.
    """
    out = {}
    for e, table in zip(entries, scores):
        mia = table["loss"].to_numpy()
        mia = np.concatenate([mia[:n_mem], mia[n_members: n_members + n_mem]])
        out[e.id] = memorization.agreement(mia, frames[e.id]["accuracy"].to_numpy(), flag_rate=flag_rate).to_dict()
    return out


def ablations(plan: list[tuple[str, str, str, str, dict]], models: list[dict]) -> dict:
    """Each ablation's students in plan order, with their leakage (AUC, TPR at 1% FPR per attack) and utility."""
    out: dict[str, list] = {"divergence": [], "student_gen_fraction": [], "teacher_topk": []}
    by_id = {m["id"]: m for m in models}
    for sid, _, _, _, spec in plan:
        if "_ablation" in spec:
            name, value = spec["_ablation"]
            m = by_id[sid]
            out[name].append({"value": value, "model_id": sid, "auc": m["auc"],
                              "tpr_at_1pct_fpr": {a: t.get("0.01") for a, t in m["tpr_at_fpr"].items()},
                              "rouge_l": m["utility"]["rouge_l"]})
    return out


def examples(entries: list[ModelEntry], frames: dict[str, pd.DataFrame], members: list[dict], n_mem: int,
             n: int = 5) -> list[dict]:
    """The first n member records with every model's greedy output."""
    out = []
    for i in range(min(n, n_mem)):
        record = members[i]
        outputs = {e.label: str(frames[e.id]["generated"].iloc[i]) for e in entries}
        out.append({"instruction": record["instruction"], "response": record["response"], "outputs": outputs})
    return out
