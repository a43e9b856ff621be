"""The audit's stages: data → teacher → students → attacks, memorization, per-block MoPe (docs/design.md §5–§7);
kdfast.audit.results assembles what they wrote into results.json."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kdfast import attacks, memorization
from kdfast.audit import defenses
from kdfast.audit.calibrated import CalibratedReferences
from kdfast.audit.config import (
    CONTROL,
    REF_ROLES,
    AuditConfig,
    ConfigError,
    check_teacher_topk_vocab,
    student_settings,
)
from kdfast.audit.degeneracy import degeneracy_metrics
from kdfast.audit.report import auc_table, text_table, write_report
from kdfast.audit.results import (
    MEMORIZATION_FILE,
    SCORES_FILE,
    Evaluation,
    assemble,
    machine_name,
    memorization_table,
)
from kdfast.audit.utility import greedy_responses, mean_rouge_l
from kdfast.data import RecordError, bundled_records, encode_all, load_hub_dataset, load_records, study_split
from kdfast.distill import DistillConfig, Distiller, make_student
from kdfast.distill.cross import across_tokenizers
from kdfast.distill.teacher_cache import cache_teacher
from kdfast.io import atomic_write_json, claim_folder
from kdfast.models import ModelError, context_len, load_model, load_tokenizer, local_path, resolve_device
from kdfast.store import Store, digest, file_digest

MATERIALIZED = ("smollm2", "tiny:")  # base models saved once as safetensors: GGUF is slow to load, tiny is random
TECHNIQUE_LABELS = {"sft": "No-KD (SFT)", "kd": "KD", "seqkd": "SeqKD", "imitkd": "ImitKD", "gkd": "GKD",
                    "minillm": "MiniLLM", "distillm": "DistiLLM"}


@dataclass
class ModelEntry:
    """One audited model: where it lives and what it is."""

    id: str
    role: str  # teacher, control, student, ablation
    label: str
    path: str
    key: str  # the stage key that produced it (downstream stages hash it)
    technique: str | None = None
    size: str | None = None


def load_source(cfg: AuditConfig) -> tuple[list[dict], list[dict] | None]:
    """The source records and the optional validation (non-member) records, per the data config."""
    d = cfg.data
    if d.source == "bundled":
        return bundled_records()[: d.limit], None
    if d.source.startswith("hub:"):
        name = d.source[4:]
        train = load_hub_dataset(name, d.split, d.fields, d.limit)
        return train, load_hub_dataset(name, d.validation, d.fields) if d.validation else None
    return load_records(d.source, d.fields, d.limit), load_records(d.validation, d.fields) if d.validation else None


def check_inputs(cfg: AuditConfig) -> None:
    """Fail fast, before any long work: data files exist and parse, local model folders exist."""
    d = cfg.data
    for label, path in (("data.source", d.source), ("data.validation", d.validation)):
        if path and path != "bundled" and not path.startswith("hub:") and not Path(path).exists():
            raise ConfigError(f"{label}: file {path} not found; give a .jsonl/.json/.csv/.parquet file, 'bundled' "
                              "or 'hub:<dataset id>'")
    specs = [("teacher.model", cfg.teacher.model), ("teacher.finetuned", cfg.teacher.finetuned),
             ("attacks.ref_second", cfg.attacks.ref_second)]
    specs += [(f"students.sizes.{k}", v) for k, v in cfg.students.sizes.items() if isinstance(v, str)]
    for label, spec in specs:
        if spec and spec.startswith("tiny:") and spec[5:] not in ("gpt2", "opt", "llama"):
            raise ConfigError(f"{label}: unknown tiny model {spec!r}; use tiny:gpt2, tiny:opt or tiny:llama")
        if spec and spec != "smollm2" and not spec.startswith("tiny:"):
            try:
                local_path(spec)  # a path that does not exist: "not found" now, not a hub error after the teacher
            except ModelError as e:
                raise ConfigError(f"{label}: {e}") from None


def base_tokenizer(cfg: AuditConfig):
    """The tokenizer every audited model shares: the teacher's (no weights are loaded)."""
    return load_tokenizer(cfg.teacher.finetuned or cfg.teacher.model)


def prepare(cfg: AuditConfig) -> dict:
    """What a run checks before any long work, and all that `kdfast audit --check` runs: the inputs exist, the
    records read and split, and every prompt fits data.max_prompt_len under data.long_prompts (errors name the
    file and line). Returns the counts of the split and of prompts truncated or dropped."""
    check_inputs(cfg)
    d = cfg.data
    try:
        train, validation = load_source(cfg)
        split = study_split(train, validation, validation_fraction=d.validation_fraction, n_members=d.n_members,
                            n_public=d.n_public, seed=cfg.seed)
    except (RecordError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    records = split.private + split.public + split.nonmembers
    tokenizer = base_tokenizer(cfg)
    check_teacher_topk_vocab(cfg, len(tokenizer))
    try:
        encoded, kept = encode_all(tokenizer, records, d.max_len, d.max_prompt_len, d.long_prompts)
    except RecordError as e:
        raise ConfigError(str(e)) from None
    return {"private": len(split.private), "public": len(split.public), "nonmembers": len(split.nonmembers),
            "long_prompts": {"policy": d.long_prompts, "records": len(records),
                             "truncated": sum(e.truncated for e in encoded), "dropped": len(records) - len(kept)}}


class Audit:
    """Runs the study for one config under `out`; every stage is cached there and a rerun resumes."""

    def __init__(self, cfg: AuditConfig, out: str | Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.stages = Store(self.out, log=self.log)
        self.device = resolve_device(cfg.device)
        self._models: dict[str, tuple] = {}
        self.privacy: dict[str, dict] = {}  # model id -> the DP-SGD spend of a DP teacher
        self.risk: dict | None = None  # the teacher's per-block MoPe AUC, when a block rule needs it
        self.blocks_of: dict[str, list[int] | str] = {}  # student id -> the teacher blocks it kept
        self.cut: dict[str, dict] = {}  # model id -> records cut to its positions, by stage (attacks, memorization)

    def log(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    # models -----------------------------------------------------------------------------------------------
    def model(self, path: str, train: bool = False):
        """(model, tokenizer) of a folder or spec, loaded once per run and kept on the audit's device."""
        if path not in self._models:
            model, tok = load_model(path)
            self._models[path] = (model.to(self.device).eval(), tok)
        model, tok = self._models[path]
        return model, tok

    def forget(self, path: str) -> None:
        self._models.pop(path, None)

    # stages -----------------------------------------------------------------------------------------------
    def data(self):
        d = self.cfg.data
        files = [p for p in (d.source, d.validation) if p and p != "bundled" and not p.startswith("hub:")]
        n_heal = self.cfg.students.heal_records
        inputs = {"data": asdict(d), "seed": self.cfg.seed, "files": [file_digest(p) for p in files], "heal": n_heal}

        def run(work: Path) -> dict:
            train, validation = load_source(self.cfg)
            split = study_split(train, validation, validation_fraction=d.validation_fraction,
                                n_members=d.n_members, n_public=d.n_public, seed=self.cfg.seed)
            atomic_write_json(work / "split.json", {"private": split.private, "public": split.public,
                                                    "nonmembers": split.nonmembers, "heal": split.spare[:n_heal]})
            return {"private": len(split.private), "public": len(split.public), "nonmembers": len(split.nonmembers),
                    "dropped": split.dropped, "summary": split.summary()}

        result, folder = self.stages.run("data", inputs, run)
        self.log(f"data: {result['summary']}")
        self.split = json.loads((folder / "split.json").read_text())
        self.split_counts = {k: result[k] for k in ("private", "public", "nonmembers", "dropped")}
        n_att = self.cfg.attacks.n_records or min(len(self.split["private"]), len(self.split["nonmembers"]))
        n_att = min(n_att, len(self.split["private"]), len(self.split["nonmembers"]))
        self.members, self.nonmembers = self.split["private"][:n_att], self.split["nonmembers"][:n_att]
        self.n_mem = min(self.cfg.memorization.n_records or n_att, n_att)
        self._say_fewer("attacks.n_records", self.cfg.attacks.n_records, n_att,
                        "the smaller of the private and non-member splits")
        self._say_fewer("memorization.n_records", self.cfg.memorization.n_records, self.n_mem,
                        "the attacked members")
        self._say_fewer("students.heal_records", n_heal, len(self.split["heal"]),
                        "the public records beyond data.n_public")
        self.eval_records = self.split["nonmembers"][-64:]
        # Stages hash the records they use, not the whole split: a new public size keeps the teacher.
        self.digest = {"private": digest(self.split["private"]),
                       "public": digest([self.split["public"], self.eval_records]),
                       "attack": digest([self.members, self.nonmembers]), "heal": digest(self.split["heal"])}

    def _say_fewer(self, key: str, asked: int | None, used: int, limit: str) -> None:
        if asked and used < asked:
            self.log(f"note: {key}={asked} asked, {used} used ({limit} hold no more)")

    def base(self) -> str:
        """The pretrained teacher (before fine-tuning); GGUF and tiny models are saved once as safetensors."""
        spec = self.cfg.teacher.model
        if not spec.startswith(MATERIALIZED):
            self.base_path, self.base_key = spec, spec
            return spec

        def run(work: Path) -> dict:
            model, tok = load_model(spec)
            model.save_pretrained(work / "model", safe_serialization=True)
            tok.save_pretrained(work / "model")
            return {"spec": spec}

        _, folder = self.stages.run("base", {"model": spec, "seed": self.cfg.seed}, run)
        self.base_path, self.base_key = str(folder / "model"), folder.name
        return self.base_path

    def teacher(self) -> ModelEntry:
        t = self.cfg.teacher
        if t.finetuned:
            return ModelEntry("teacher", "teacher", "Teacher", t.finetuned, t.finetuned)
        inputs = {"base": self.base_key, "data": self.digest["private"], "teacher": asdict(t), "seed": self.cfg.seed,
                  "max_len": self.cfg.data.max_len, "max_prompt_len": self.cfg.data.max_prompt_len,
                  "long_prompts": self.cfg.data.long_prompts}

        def run(work: Path) -> dict:
            if t.dp is not None:
                return defenses.train_teacher_dp(self, work, defenses.dp_config(t.dp, "teacher.dp"))
            model, tok = load_model(self.base_path)
            cfg = self._stage_config(work, technique="sft", lr=t.lr, epochs=t.epochs, batch_size=t.batch_size,
                                     bf16=t.bf16, max_len=self.cfg.data.max_len,
                                     max_prompt_len=self.cfg.data.max_prompt_len,
                                     long_prompts=self.cfg.data.long_prompts, seed=self.cfg.seed, lora_rank=t.lora_rank)
            return self._trained(Distiller(None, model, tok, cfg).train(self.split["private"]))

        result, folder = self.stages.run("teacher", inputs, run)
        if "dp" in result:
            self.privacy["teacher"] = result["dp"]
        return ModelEntry("teacher", "teacher", "Teacher", str(folder / result["final"]), folder.name)

    def student_plan(self) -> list[tuple[str, str, str, str, dict]]:
        """(id, role, label, size, DistillConfig overrides) of every student: control, techniques, ablations."""
        s, plan = self.cfg.students, []
        techniques = ([CONTROL] if s.control else []) + list(s.techniques)
        for i, size in enumerate(s.sizes):
            for tech in techniques:
                role = "control" if tech == CONTROL else "student"
                plan.append((f"{size}/{tech}", role, f"{TECHNIQUE_LABELS[tech]} ({size})", size, {"technique": tech}))
            if i == 0:
                for kind in self.cfg.ablations.divergence:
                    plan.append((f"{size}/kd-{kind}", "ablation", f"KD-{kind} ({size})", size,
                                 {"technique": "kd", "loss": kind, "_ablation": ("divergence", kind)}))
                for frac in self.cfg.ablations.student_gen_fraction:
                    plan.append((f"{size}/kd-gen{frac:g}", "ablation", f"KD gen {frac:g} ({size})", size,
                                 {"technique": "kd", "student_gen_fraction": frac,
                                  "_ablation": ("student_gen_fraction", frac)}))
                for k in self.cfg.ablations.teacher_topk:
                    plan.append((f"{size}/kd-top{k}", "ablation", f"KD top-{k} cache ({size})", size,
                                 {"technique": "kd", "_teacher_topk": k, "_ablation": ("teacher_topk", k)}))
        return plan + defenses.defense_plan(self.cfg)

    def student(self, teacher: ModelEntry, sid: str, role: str, label: str, size: str, spec: dict) -> ModelEntry:
        overrides = {k: v for k, v in spec.items() if not k.startswith("_")}
        settings = student_settings(self.cfg, overrides.pop("technique"), overrides)
        if "_teacher_topk" in spec:
            settings["teacher_cache"] = self.teacher_cache(teacher, spec["_teacher_topk"], settings)
        init = defenses.student_blocks(self, size, spec.get("_init", self.cfg.students.init), self.risk)
        self.blocks_of[sid] = init
        inputs = {"teacher": teacher.key, "base": self.base_key, "data": self.digest["public"], "init": init,
                  "settings": settings}

        healed, healed_key = self.healed(init) if isinstance(init, list) else (None, None)
        if healed:
            inputs["healed"] = healed_key

        def run(work: Path) -> dict:
            if healed:
                student, tok = load_model(healed)
            else:
                base, tok = load_model(self.base_path) if isinstance(init, list) else load_model(init)
                student = make_student(base, layers=init) if isinstance(init, list) else base
                del base
            cfg = self._stage_config(work, **settings)
            teacher_model, teacher_tok = self.model(teacher.path) if cfg.needs_teacher else (None, None)
            if teacher_tok is not None and not isinstance(init, list):  # a size given as a model: its own tokenizer
                cfg = across_tokenizers(cfg, teacher_tok, tok, f"students.sizes.{size}")
            return self._trained(Distiller(teacher_model, student, tok, cfg, teacher_tokenizer=teacher_tok).train(
                self.split["public"], self.eval_records))

        result, folder = self.stages.run(f"student-{sid.replace('/', '-')}", inputs, run)
        return ModelEntry(sid, role, label, str(folder / result["final"]), folder.name, settings["technique"], size)

    def healed(self, blocks: list[int]) -> tuple[str, str] | tuple[None, None]:
        """(model folder, stage key) of the student of these teacher blocks after its LM-loss warm-up on the spare
        public records (students.heal_records; Nones when 0): one stage per block choice, shared by every technique."""
        s = self.cfg.students
        if not s.heal_records or not self.split["heal"]:
            return None, None
        settings = student_settings(self.cfg, "sft", {"epochs": s.heal_epochs, "lr": s.heal_lr or s.lr})
        inputs = {"base": self.base_key, "data": self.digest["heal"], "blocks": blocks, "settings": settings}

        def run(work: Path) -> dict:
            base, tok = load_model(self.base_path)
            student = make_student(base, layers=blocks)
            del base
            return self._trained(Distiller(None, student, tok, self._stage_config(work, **settings)).train(
                self.split["heal"]))

        result, folder = self.stages.run("heal", inputs, run)
        return str(folder / result["final"]), folder.name

    def _stage_config(self, work: Path, **fields) -> DistillConfig:
        """A training stage's DistillConfig: checkpointed under work/run (a killed stage resumes), on the audit's
        device."""
        return DistillConfig(**fields, out=str(work / "run"), resume=True, save_every=50, device=str(self.device),
                             progress=self.progress)

    def _trained(self, summary) -> dict:
        self.log(str(summary))
        return {"final": "run/final", "loss": summary.loss, "steps": summary.steps}

    def teacher_cache(self, teacher: ModelEntry, k: int, settings: dict) -> str:
        """The folder of the teacher's top-k log-probs on the public half (ablations.teacher_topk), captured once
        per k with the temperature and lengths of the student that trains from it."""
        cfg = DistillConfig(**settings)
        inputs = {"teacher": teacher.key, "data": self.digest["public"], "k": k, "temperature": cfg.temperature,
                  "max_len": cfg.max_len, "max_prompt_len": cfg.max_prompt_len, "long_prompts": cfg.long_prompts}

        def run(work: Path) -> dict:
            model, tok = self.model(teacher.path)
            summary = cache_teacher(model, tok, self.split["public"], k=k, out=work / "cache",
                                    temperature=cfg.temperature, max_len=cfg.max_len,
                                    max_prompt_len=cfg.max_prompt_len, long_prompts=cfg.long_prompts,
                                    batch_tokens=self.cfg.attacks.batch_tokens, progress=self.progress)
            return {"tokens": summary.tokens, "bytes": summary.bytes}

        return str(self.stages.run(f"teacher-cache-k{k}", inputs, run)[1] / "cache")

    def reference(self, name: str, spec: str) -> tuple[np.ndarray, str]:
        """A reference model's mean log-likelihood per attack record, computed once and shared by every target."""
        a = self.cfg.attacks
        inputs = {"model": self.base_key if spec == self.base_path else spec, "data": self.digest["attack"],
                  "batch_tokens": a.batch_tokens, "n_records": a.n_records, "autocast": a.autocast}

        def run(work: Path) -> dict:
            model, tok = self.model(spec)
            table = attacks.score(model, tok, self.members + self.nonmembers, ["loss"], batch_tokens=a.batch_tokens,
                                  autocast=a.autocast, out=work / "parts", progress=self.progress)
            np.save(work / "ll.npy", table["loss"].to_numpy())
            return {"model": spec}

        _, folder = self.stages.run(f"reference-{name}", inputs, run)
        return np.load(folder / "ll.npy"), folder.name

    def attack(self, entry: ModelEntry, refs: dict[str, tuple[np.ndarray, str]],
               calibrated: CalibratedReferences | None = None) -> tuple[dict, Path]:
        """(metrics, folder) of the attack stage that ran for `entry`: consumers read this folder's scores."""
        a = self.cfg.attacks
        names = [n for n in a.attacks if n not in REF_ROLES]
        if (refs or calibrated) and "loss" not in names:
            names.insert(0, "loss")
        sigma = a.mope_sigma_teacher if entry.role == "teacher" else a.mope_sigma_student
        inputs = {"model": entry.key, "data": self.digest["attack"], "attacks": asdict(a),
                  "refs": {k: v[1] for k, v in refs.items()},
                  "sigma": sigma, "calibrated": calibrated.inputs(entry) if calibrated else None}

        def run(work: Path) -> dict:
            model, tok = self.model(entry.path)
            records, max_len = self.members + self.nonmembers, context_len(model, None)
            n_cut = self._note_cut("attacks", entry, attacks.records_cut(tok, records, max_len), len(records), max_len)
            table = attacks.score(model, tok, records, names,
                                  membership=[1] * len(self.members) + [0] * len(self.nonmembers),
                                  ks=tuple(a.ks), mope_n=a.mope_n, mope_sigma=sigma, batch_tokens=a.batch_tokens,
                                  autocast=a.autocast, seed=self.cfg.seed, out=work / "parts", progress=self.progress)
            for name, (ref_ll, _) in refs.items():
                table[name] = attacks.reference_scores(table["loss"].to_numpy(), ref_ll)
            if calibrated:
                calibrated.add_scores(entry, model, tok, table, work)
            if "loss" not in a.attacks:
                table = table.drop(columns="loss")
            table = attacks.with_percentiles(table)
            table.to_parquet(work / SCORES_FILE)
            return {"metrics": attacks.evaluate(table, n_bootstrap=a.bootstrap, seed=self.cfg.seed,
                                                calibration=a.calibration), "records_cut_to_max_len": n_cut}

        result, folder = self.stages.run(f"attacks-{entry.id.replace('/', '-')}", inputs, run)
        self.cut.setdefault(entry.id, {})["attacks"] = result.get("records_cut_to_max_len")
        return result["metrics"], folder

    def _note_cut(self, stage: str, entry: ModelEntry, n_cut: int, n: int, max_len: int | None) -> int:
        """Log, before the stage's long work, how many records it cuts to the model's positions; the count."""
        if n_cut:
            self.log(f"  {stage} {entry.id}: {n_cut} of {n} records cut to {max_len} tokens (the model's positions); "
                     "shorten them in the data to measure them whole")
        return n_cut

    def blocks(self, entry: ModelEntry) -> dict:
        a = self.cfg.attacks
        inputs = {"model": entry.key, "data": self.digest["attack"], "n": a.mope_block_n, "sigma": a.mope_sigma_student,
                  "batch_tokens": a.batch_tokens, "autocast": a.autocast}

        def run(work: Path) -> dict:
            model, tok = self.model(entry.path)
            table = attacks.score(model, tok, self.members + self.nonmembers, ["mope_block"],
                                  membership=[1] * len(self.members) + [0] * len(self.nonmembers),
                                  mope_n=a.mope_block_n, mope_sigma=a.mope_sigma_student, batch_tokens=a.batch_tokens,
                                  autocast=a.autocast, seed=self.cfg.seed, out=work / "parts", progress=self.progress)
            metrics = attacks.evaluate(table, n_bootstrap=0)
            return {"auc": {c.split("@")[1]: m["auc"] for c, m in metrics.items()}}

        return self.stages.run(f"blocks-{entry.id.replace('/', '-')}", inputs, run)[0]["auc"]

    def memorize(self, entry: ModelEntry) -> tuple[dict, Path]:
        """(result, folder) of the memorization stage for `entry`: consumers read this folder's per-record table."""
        m = self.cfg.memorization
        records = self.members[: self.n_mem] + self.nonmembers[: self.n_mem]
        inputs = {"model": entry.key, "data": self.digest["attack"], "memorization": asdict(m)}

        def run(work: Path) -> dict:
            model, tok = self.model(entry.path)
            max_len = context_len(model, None)
            fitted = memorization.fit_prompts(tok, records, max_len, m.n_tokens)
            n_cut = self._note_cut("memorization", entry, sum(e.truncated for e in fitted), len(records), max_len)
            res = memorization.match_accuracy(model, tok, records, n_tokens=m.n_tokens, batch_size=m.batch_size,
                                              progress=self.progress)
            frame = res.to_frame()
            frame["member"] = [1] * self.n_mem + [0] * self.n_mem
            frame.to_parquet(work / MEMORIZATION_FILE)
            held_out = self.nonmembers[: self.n_mem]
            texts = (res.generated[self.n_mem:] if m.utility_tokens in (None, m.n_tokens) else
                     greedy_responses(model, tok, held_out, m.utility_tokens, m.batch_size, self.progress))
            utility = mean_rouge_l(texts, [r["response"] for r in held_out])
            acc = np.asarray(res.accuracy)
            member, nonmember = float(acc[: self.n_mem].mean()), float(acc[self.n_mem:].mean())
            approx = np.asarray(res.approx, dtype=float)
            return {"member": member, "nonmember": nonmember, "gap": member - nonmember,
                    "member_approx": float(approx[: self.n_mem].mean()),
                    "nonmember_approx": float(approx[self.n_mem:].mean()), "rouge_l": utility,
                    "records_cut_to_max_len": n_cut}

        result, folder = self.stages.run(f"memorization-{entry.id.replace('/', '-')}", inputs, run)
        self.cut.setdefault(entry.id, {})["memorization"] = result.pop("records_cut_to_max_len", None)
        return result, folder

    def health(self, entry: ModelEntry, mem_folder: Path) -> dict:
        """degeneracy_metrics of a model: its greedy answers to the memorization's non-member prompts and its
        cross-entropy on those records' responses (mean over records of nats per response token)."""
        a = self.cfg.attacks
        inputs = {"model": entry.key, "data": self.digest["attack"], "memorization": asdict(self.cfg.memorization),
                  "batch_tokens": a.batch_tokens, "autocast": a.autocast}

        def run(work: Path) -> dict:
            generations = memorization_table(mem_folder)["generated"].astype(str).tolist()[self.n_mem:]
            return degeneracy_metrics(generations, self._held_out_cross_entropy(entry.path))

        result = self.stages.run(f"health-{entry.id.replace('/', '-')}", inputs, run)[0]
        return {k: v for k, v in result.items() if not k.startswith("_")}

    def base_cross_entropy(self) -> float:
        """The pretrained base's held-out cross-entropy: what the degeneracy rule measures the models against."""
        a = self.cfg.attacks
        inputs = {"model": self.base_key, "data": self.digest["attack"], "n": self.n_mem,
                  "batch_tokens": a.batch_tokens, "autocast": a.autocast}

        def run(work: Path) -> dict:
            return {"cross_entropy": self._held_out_cross_entropy(self.base_path)}

        ce = self.stages.run("health-base", inputs, run)[0]["cross_entropy"]
        self.forget(self.base_path)
        return ce

    def _held_out_cross_entropy(self, path: str) -> float:
        """Mean over the memorization's non-member records of the model's nats per response token."""
        a = self.cfg.attacks
        model, tok = self.model(path)
        table = attacks.score(model, tok, self.nonmembers[: self.n_mem], ["loss"], batch_tokens=a.batch_tokens,
                              autocast=a.autocast, progress=self.progress)
        return float(-np.nanmean(table["loss"].to_numpy()))

    # the whole study --------------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.time()
        fit = prepare(self.cfg)["long_prompts"]
        self.log(f"kdfast audit '{self.cfg.name}' → {self.out} (device: {self.device})")
        if fit["truncated"] or fit["dropped"]:
            self.log(f"data: {fit['truncated']} prompt(s) truncated, {fit['dropped']} record(s) dropped of "
                     f"{fit['records']} over data.max_prompt_len={self.cfg.data.max_prompt_len} "
                     f"(data.long_prompts={fit['policy']})")
        self.data()
        self.split_counts["long_prompts"] = fit
        self.base()
        teacher = self.teacher()
        if defenses.needs_risk(self.cfg):
            self.risk = defenses.teacher_risk(self, teacher)
        extra = [defenses.dp_teacher(self)] if self.cfg.defenses.dp is not None else []
        entries = [teacher, *extra] + [self.student(extra[0] if item[4].get("_teacher") == "dp" else teacher, *item)
                                       for item in self.student_plan()]
        for entry in [teacher, *extra]:
            self.forget(entry.path)
        wanted = dict(zip(REF_ROLES, (self.base_path, self.cfg.attacks.ref_second)))
        refs = {name: self.reference(name, spec) for name, spec in wanted.items()
                if name in self.cfg.attacks.attacks and spec}
        for spec in wanted.values():
            self.forget(spec)
        calibrated = CalibratedReferences(self, teacher) if self.cfg.attacks.calibrated else None
        evaluations = []
        for entry in entries:
            evaluations.append(self._evaluate(entry, refs, calibrated))
            self.forget(entry.path)
        results = assemble(self.cfg, entries, evaluations, plan=self.student_plan(), members=self.members,
                           n_mem=self.n_mem, split=self.split_counts, blocks_of=self.blocks_of, privacy=self.privacy,
                           cut=self.cut, risk=self.risk, base_cross_entropy=self.base_cross_entropy(),
                           stages={"ran": self.stages.ran, "reused": self.stages.reused},
                           machine=machine_name(self.device), seconds=time.time() - started)
        paths = write_report(results, self.out)
        self.log("\n" + text_table(*auc_table(results)))
        for entry, evaluation in zip(entries, evaluations):
            if left_out := attacks.left_out_text(evaluation.metrics):
                self.log(f"{entry.label}: left out of its figures (non-finite scores): {left_out}")
        self.log(f"\nReport: {paths['report']}\nResults: {paths['results']}  Summary: {paths['summary']}")
        return results

    def _evaluate(self, entry: ModelEntry, refs: dict, calibrated: CalibratedReferences | None = None) -> Evaluation:
        metrics, attack_folder = self.attack(entry, refs, calibrated)
        mem, mem_folder = self.memorize(entry)
        blocks = self.blocks(entry) if self.cfg.attacks.mope_block and entry.role != "teacher" else None
        return Evaluation(metrics, attack_folder, mem, mem_folder, blocks, self.health(entry, mem_folder))


def run_audit(cfg: AuditConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    """Run (or resume) the whole study; returns the results dict also written to <out>/results.json."""
    out = Path(out or Path("runs") / cfg.name)
    try:
        with claim_folder(out, "--out"):
            return Audit(cfg, out, progress).run()
    except (RecordError, ModelError) as e:
        raise ConfigError(str(e)) from e
