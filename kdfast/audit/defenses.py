"""Defenses in the audit: students from low/high-risk teacher blocks, a DP-SGD teacher, softened logit release."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdfast.audit.config import AuditConfig, ConfigError, _suggest
from kdfast.distill.dp import DPConfig, train_dp
from kdfast.distill.student import INIT_RULES, choose_blocks
from kdfast.store import digest

if TYPE_CHECKING:
    from kdfast.audit.pipeline import Audit, ModelEntry

DP_KEYS = tuple(f.name for f in dataclasses.fields(DPConfig))


def dp_config(values: dict, where: str) -> DPConfig:
    """A DPConfig from a config mapping; unknown keys and bad values name `where` and the valid keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: give a mapping such as {{epsilon: 8, delta: 1e-5, max_grad_norm: 1.0}}, "
                          f"got {values!r}")
    for key in values:
        if key not in DP_KEYS:
            raise ConfigError(f"unknown config key '{where}.{key}'{_suggest(str(key), DP_KEYS)}; valid keys here: "
                              f"{', '.join(DP_KEYS)}")
    dp = DPConfig(**values)
    try:
        dp.check(where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dp


def check_defenses(cfg: AuditConfig) -> None:
    """Refuse defense settings that cannot run, before any training (called by config.validate)."""
    s, d = cfg.students, cfg.defenses
    if s.init not in INIT_RULES:
        raise ConfigError(f"students.init: unknown value {s.init!r}{_suggest(s.init, INIT_RULES)}; "
                          f"choose from {', '.join(INIT_RULES)}")
    if s.init != "evenly":
        named = [k for k, v in s.sizes.items() if not isinstance(v, list)]
        if named:
            raise ConfigError(f"students.init={s.init} picks teacher blocks, but students.sizes.{named[0]} is a model "
                              "id; give a list of teacher layers or set students.init: evenly")
    for rule in d.init:
        if rule not in ("low_risk", "high_risk"):
            raise ConfigError(f"defenses.init: unknown value {rule!r}{_suggest(str(rule), INIT_RULES[1:])}; "
                              "choose from low_risk, high_risk")
    if cfg.teacher.dp is not None:
        dp_config(cfg.teacher.dp, "teacher.dp")
        if cfg.teacher.lora_rank or cfg.teacher.finetuned:
            raise ConfigError("teacher.dp: DP-SGD fine-tunes the whole teacher; unset teacher.lora_rank and "
                              "teacher.finetuned")
    if d.dp is not None:
        dp_config(d.dp, "defenses.dp")
    if (cfg.teacher.dp is not None or d.dp is not None) and re.search(r"(^|[:/])opt", cfg.teacher.model.lower()):
        raise ConfigError(f"teacher.model {cfg.teacher.model!r}: DP-SGD cannot run on OPT (Opacus cannot take "
                          "per-sample gradients through its positional embedding); "
                          "use a LLaMA- or GPT-2-family teacher")
    if not (d.init or d.dp is not None or d.temperature):
        return
    if d.technique not in s.techniques:
        raise ConfigError(f"defenses.technique {d.technique!r} must also be in students.techniques (its undefended "
                          f"student is the baseline); add it there or choose one of {', '.join(s.techniques)}")
    size = defense_size(cfg)
    if not isinstance(s.sizes[size], list) and d.init:
        raise ConfigError(f"defenses.init picks teacher blocks, but students.sizes.{size} is a model id; set "
                          "defenses.size to a size given as a list of teacher layers")


def defense_size(cfg: AuditConfig) -> str:
    size = cfg.defenses.size or next(iter(cfg.students.sizes))
    if size not in cfg.students.sizes:
        raise ConfigError(f"defenses.size {size!r} is not in students.sizes ({', '.join(cfg.students.sizes)})")
    return size


def needs_risk(cfg: AuditConfig) -> bool:
    return cfg.students.init != "evenly" or bool(cfg.defenses.init)


def defense_plan(cfg: AuditConfig) -> list[tuple[str, str, str, str, dict]]:
    """(id, role, label, size, spec) of every defended student, as Audit.student_plan lists students.

    spec holds DistillConfig overrides and, under keys starting with "_", the defense: `_defense` (kind, value),
    `_init` (a block rule), `_teacher` ("dp": distil from the DP teacher).
    """
    d = cfg.defenses
    if not (d.init or d.dp is not None or d.temperature):
        return []
    size, tech = defense_size(cfg), d.technique
    plan = [(f"{size}/{tech}-{rule}", "defense", f"{tech.upper()} {rule.replace('_', '-')} init ({size})", size,
             {"technique": tech, "_init": rule, "_defense": ("init", rule)}) for rule in d.init]
    if d.dp is not None:
        eps = dp_config(d.dp, "defenses.dp").epsilon
        plan.append((f"{size}/{tech}-dp", "defense", f"{tech.upper()} from DP teacher ε={eps:g} ({size})", size,
                     {"technique": tech, "_teacher": "dp", "_defense": ("dp", eps)}))
    for t in d.temperature:
        plan.append((f"{size}/{tech}-t{t:g}", "defense", f"{tech.upper()} T={t:g} ({size})", size,
                     {"technique": tech, "temperature": float(t), "_defense": ("temperature", float(t))}))
    return plan


def train_teacher_dp(audit: Audit, work: Path, dp: DPConfig) -> dict:
    """The teacher's fine-tuning on the private half with DP-SGD; the saved model and the privacy spent."""
    from kdfast.models import load_model

    t, cfg = audit.cfg.teacher, audit.cfg
    model, tok = load_model(audit.base_path)
    summary = train_dp(model, tok, audit.split["private"], dp, epochs=t.epochs, lr=dp.lr or t.lr,
                       batch_size=t.batch_size, max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len,
                       seed=cfg.seed, device=audit.device)
    model.save_pretrained(work / "final", safe_serialization=True)
    tok.save_pretrained(work / "final")
    audit.log(f"  DP-SGD: ε = {summary.epsilon:.2f} at δ = {summary.delta:g} (σ = {summary.noise_multiplier:.3f}, "
              f"q = {summary.sample_rate:.3f}, {summary.steps} steps); loss {summary.losses[0]:.3f} → "
              f"{summary.losses[-1]:.3f}")
    return {"final": "final", "loss": summary.losses[-1], "steps": summary.steps, "dp": summary.to_dict()}


def dp_teacher(audit: Audit) -> ModelEntry:
    """The defense's DP-SGD teacher (defenses.dp), trained from the same base on the same private half."""
    from kdfast.audit.pipeline import ModelEntry

    dp = dp_config(audit.cfg.defenses.dp, "defenses.dp")
    t = audit.cfg.teacher
    inputs = {"base": audit.base_key, "data": audit.digest["private"], "teacher": asdict(t), "dp": asdict(dp),
              "seed": audit.cfg.seed, "max_len": audit.cfg.data.max_len,
              "max_prompt_len": audit.cfg.data.max_prompt_len}
    result, folder = audit.stages.run("teacher-dp", inputs, lambda work: train_teacher_dp(audit, work, dp))
    audit.privacy["teacher-dp"] = result["dp"]
    return ModelEntry("teacher-dp", "teacher", f"Teacher (DP ε={result['dp']['epsilon']:.1f})",
                      str(folder / result["final"]), folder.name)


def risk_records(audit: Audit) -> tuple[list[dict], list[dict], str]:
    """Members and non-members for the teacher's per-block risk: off the attack records where the split leaves
    enough (choosing blocks on the records the students are then attacked with would favour the choice)."""
    k = audit.cfg.defenses.risk_records
    n_att = len(audit.members)
    members = audit.split["private"][n_att:]
    nonmembers = audit.split["nonmembers"][n_att: len(audit.split["nonmembers"]) - len(audit.eval_records)]
    n = min(k, len(members), len(nonmembers))
    if n >= min(k, 8):
        return members[:n], nonmembers[:n], "held out from the attack records"
    return audit.members[:k], audit.nonmembers[:k], "the attack records (too few others)"


def teacher_risk(audit: Audit, teacher: ModelEntry) -> dict:
    """Per-block MoPe AUC of the teacher ({block: auc}, `which` records it used), a cached stage."""
    from kdfast import attacks

    a, d = audit.cfg.attacks, audit.cfg.defenses
    members, nonmembers, which = risk_records(audit)
    records = members + nonmembers
    inputs = {"model": teacher.key, "data": digest(records), "n": d.risk_n, "sigma": a.mope_sigma_teacher,
              "batch_tokens": a.batch_tokens, "autocast": a.autocast, "seed": audit.cfg.seed}

    def run(work: Path) -> dict:
        model, tok = audit.model(teacher.path)
        table = attacks.score(model, tok, records, ["mope_block"],
                              membership=[1] * len(members) + [0] * len(nonmembers),
                              mope_n=d.risk_n, mope_sigma=a.mope_sigma_teacher, batch_tokens=a.batch_tokens,
                              autocast=a.autocast, seed=audit.cfg.seed, out=work / "parts", progress=audit.progress)
        metrics = attacks.evaluate(table, n_bootstrap=0)
        return {"auc": {c.split("@")[1]: m["auc"] for c, m in metrics.items()}, "records": which,
                "n": len(members)}


    result = audit.stages.run("risk-teacher", inputs, run)[0]
    return {"auc": result["auc"], "records": result["records"], "n": result["n"]}


def student_blocks(audit: Audit, size: str, rule: str, risk: dict | None) -> list[int] | str:
    """The teacher blocks a student of `size` keeps under `rule`, ranked by |per-block MoPe AUC − 0.5| (a model-id
    size is returned as it is)."""
    init = audit.cfg.students.sizes[size]
    if not isinstance(init, list) or rule == "evenly":
        return init
    # An AUC far below 0.5 separates members as well as one far above (the score's sign is inverted): risk is the
    # distance from chance.
    leak = {int(b): (0.0 if v is None or not np.isfinite(v) else abs(v - 0.5)) for b, v in risk["auc"].items()}
    return choose_blocks(len(leak), rule, len(init), leak)


def defense_table(cfg: AuditConfig, points: list[dict], privacy: dict) -> list[dict]:
    """One entry per defended model and per baseline it is compared with: the defense (kind, value), the model,
    its strongest attack's AUC, TPR at 1% FPR and ROUGE-L (from the frontier points), and the ε spent where DP."""
    plan = defense_plan(cfg)
    if not plan:
        return []
    size, tech = defense_size(cfg), cfg.defenses.technique
    wanted = [("none", None, f"{size}/{tech}"), ("none", None, "teacher")]
    wanted += [(spec["_defense"][0], spec["_defense"][1], sid) for sid, _, _, _, spec in plan]
    if cfg.defenses.dp is not None:
        wanted.append(("dp", dp_config(cfg.defenses.dp, "defenses.dp").epsilon, "teacher-dp"))
    by_id = {p["id"]: p for p in points}
    # A student of the DP teacher sees the private half only through it: by post-processing it keeps the ε.
    spent = {**privacy, **{sid: privacy.get("teacher-dp") for sid, _, _, _, spec in plan if spec.get("_teacher")}}
    table = []
    for kind, value, mid in wanted:
        if mid in by_id:
            p = by_id[mid]
            table.append({"defense": kind, "value": value, "model_id": mid, "label": p["label"], "role": p["role"],
                         **{k: p[k] for k in ("attack", "auc", "tpr_at_1pct_fpr", "rouge_l")},
                         "epsilon": (spent.get(mid) or {}).get("epsilon")})
    return table
