"""The audit's configuration: dataclasses with working defaults, presets, and strict YAML loading."""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from kdfast.attacks.registry import REGISTRY
from kdfast.data.encode import LONG_PROMPTS
from kdfast.distill.config import TECHNIQUES as DISTILL_TECHNIQUES
from kdfast.validation import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Range, check_config, check_device

# The SFT control (students.control) trains beside every distilled student; students.techniques lists the others.
CONTROL = "sft"
TECHNIQUES = tuple(t for t in DISTILL_TECHNIQUES if t != CONTROL)

# How the attack registry (kdfast.attacks.registry) enters the audit, the one place the audit's attack names come
# from. The `ref` attack runs once per reference role, its column named by the role: ref_base against the pretrained
# base, ref_second against attacks.ref_second. Attacks the audit runs by settings of their own: per-block MoPe
# (attacks.mope_block, with its own perturbation count and stage) and the calibrated ones (attacks.calibrated, against
# the audit's OUT references). The rest go in attacks.attacks when the audit has what they need: the membership
# labels and passes of the target; dc_pdd's reference corpus it does not have.
REF_ROLES = ("ref_base", "ref_second")
OWN_SETTINGS = {"mope_block": "attacks.mope_block", **{a.name: "attacks.calibrated" for a in REGISTRY.values()
                                                      if a.calibrated}}
PROVIDED = frozenset({"membership", "extra_pass", "perturbation", "gradients"})


def audit_attacks() -> tuple[str, ...]:
    """The names attacks.attacks takes, in the registry's column order (REF_ROLES in the place of `ref`)."""
    names = []
    for a in REGISTRY.values():
        if a.name == "ref":
            names += REF_ROLES
        elif a.name not in OWN_SETTINGS and a.needs <= PROVIDED:
            names.append(a.name)
    return tuple(names)


CALIBRATED = tuple(a for a, key in OWN_SETTINGS.items() if key == "attacks.calibrated")
PRESETS = ("default", "tiny", "paper-gpt2", "paper-opt", "paper-llama", "defenses")


class ConfigError(ValueError):
    """A configuration mistake: names the key (or file) and the fix, before any long work starts."""


@dataclass
class DataConfig:
    """Where records come from and how the study splits them (docs/design.md §7)."""

    source: str = "bundled"  # "bundled", a .jsonl/.json/.csv/.parquet file, or "hub:<dataset id>"
    validation: str | None = None  # non-member file or hub split; None holds out validation_fraction of source
    split: str = "train"  # hub split of the source
    fields: dict[str, str] = field(default_factory=dict)  # kdfast name -> source column, e.g. {input: context}
    limit: PositiveInt | None = None  # read at most this many source records
    validation_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.2
    n_members: PositiveInt | None = 400  # private half (teacher data) cap
    n_public: PositiveInt | None = 800  # public half (student data) cap
    max_len: Annotated[int, Range(ge=2)] = 96
    max_prompt_len: PositiveInt = 64
    # a prompt over max_prompt_len: cut to its end (next to the response marker, as TRL does), drop, or error
    long_prompts: Literal[LONG_PROMPTS] = "truncate"


@dataclass
class TeacherConfig:
    """The pretrained teacher and its fine-tuning on the private half (members)."""

    model: str = "smollm2"  # pretrained base: hub id, local folder, .gguf, "smollm2", or "tiny:<family>"
    finetuned: str | None = None  # an already fine-tuned teacher: skip training
    epochs: PositiveFloat = 3.0
    lr: PositiveFloat = 1e-4
    batch_size: PositiveInt = 16
    bf16: bool | None = None  # bf16 autocast while fine-tuning (None: on GPUs only)
    # > 0: fine-tune LoRA adapters of this rank, merged into the saved teacher (paper-llama)
    lora_rank: NonNegativeInt = 0
    # DP-SGD: {epsilon: 8, delta: 1e-5, max_grad_norm: 1.0} (kdfast.distill.dp.DPConfig)
    dp: dict[str, Any] | None = None


@dataclass
class StudentsConfig:
    """Students: one per technique and size, plus the SFT control."""

    techniques: list[Literal[TECHNIQUES]] = field(default_factory=lambda: list(TECHNIQUES))
    control: bool = True  # the No-KD (CONTROL: SFT) control
    # name -> teacher layers or a model
    sizes: dict[str, Any] = field(default_factory=lambda: {"small": [0, 10, 20, 29]})
    epochs: PositiveFloat = 3.0
    lr: PositiveFloat = 2e-4
    batch_size: PositiveInt = 16
    distill: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields for every technique
    # technique -> DistillConfig overrides
    per_technique: dict[Literal[TECHNIQUES], dict[str, Any]] = field(default_factory=dict)
    # LM-loss (SFT) warm-up of every student cut from the teacher's blocks, before it is distilled: on this many
    # public records beyond data.n_public (neither members nor non-members), heal_epochs at heal_lr (None: lr)
    heal_records: NonNegativeInt = 0
    heal_epochs: PositiveFloat = 1.0
    heal_lr: PositiveFloat | None = None
    init: str = "evenly"  # blocks of list sizes: evenly (as listed), low_risk / high_risk (teacher's per-block MoPe)


@dataclass
class AttacksConfig:
    """Membership inference on the teacher and every student: members vs non-members."""

    # names of audit_attacks() (checked by validate(), so a newly registered attack is taken at once)
    attacks: list[str] = field(default_factory=lambda: ["loss", "zlib", "lowercase", "min_k", "min_k_pp", "ref_base",
                                                        "ref_second", "mope"])
    ref_second: str | None = None  # the second reference model (the paper: StableLM-3B); None skips ref_second
    n_records: PositiveInt | None = 300  # members and non-members each
    ks: list[Annotated[float, Range(gt=0, le=1)]] = field(default_factory=lambda: [0.1, 0.2])
    mope_n: PositiveInt = 10
    mope_sigma_teacher: PositiveFloat = 0.005
    mope_sigma_student: PositiveFloat = 0.01
    mope_block: bool = True  # per-block MoPe of each student (the registry's mope_block attack, in its own stage)
    mope_block_n: PositiveInt = 10  # perturbations per block
    batch_tokens: PositiveInt = 8192
    autocast: bool | None = None  # bf16 autocast of the scoring passes (None: on GPUs only)
    bootstrap: NonNegativeInt = 200
    # Calibrated attacks: OUT references of rmia/lira (the teacher's: the pretrained base + ref_second; a
    # student's: the base + `references` extra SFT controls trained on the public half with seeds seed+1, ...).
    calibrated: list[Literal[CALIBRATED]] = field(default_factory=lambda: list(CALIBRATED))
    references: NonNegativeInt = 2
    population: NonNegativeInt = 200  # rmia's population: non-members beyond the attack records
    rmia_a: Fraction = 1.0  # RMIA's offline correction (1: none)
    rmia_gamma: PositiveFloat = 1.0
    # fraction of the non-members that sets the TPR@FPR thresholds (the rest measures them)
    calibration: Annotated[float, Range(gt=0, lt=1)] = 0.5


@dataclass
class MemorizationConfig:
    """Greedy match accuracy of every model; its non-member generations also give the utility (ROUGE-L)."""

    n_tokens: PositiveInt = 32
    n_records: PositiveInt | None = 200  # members and non-members each (the first of the attack records)
    batch_size: PositiveInt = 32
    taus: list[Fraction] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    # flag the top 10% of each signal for the agreement analysis
    agreement_flag_rate: Annotated[float, Range(gt=0, le=1)] = 0.1
    utility_tokens: PositiveInt | None = None  # tokens generated for ROUGE-L (None: reuse the n_tokens generations)


@dataclass
class AblationsConfig:
    """Optional studies on top of the main grid (each entry trains more students)."""

    divergence: list[str] = field(default_factory=list)  # KD with these losses, e.g. [fkl, rkl]
    student_gen_fraction: list[Fraction] = field(default_factory=list)  # e.g. [0.0, 0.5, 1.0]
    # KD of the first size from a top-k teacher cache (kdfast cache-teacher) per k, e.g. [8, 64]
    teacher_topk: list[PositiveInt] = field(default_factory=list)


@dataclass
class DefensesConfig:
    """Defended students beside the plain ones, each a point on the privacy-utility frontier (kdfast.audit.defenses)."""

    technique: str = "kd"  # what every defended student is trained with (also in students.techniques: the baseline)
    size: str | None = None  # a list size of students.sizes (None: the first)
    # low_risk / high_risk: blocks of the least / most leaky teacher blocks
    init: list[str] = field(default_factory=list)
    dp: dict[str, Any] | None = None  # a DP-SGD teacher beside the plain one, and a student distilled from it
    # logit release: the teacher softened at these temperatures
    temperature: list[PositiveFloat] = field(default_factory=list)
    # members and non-members each for the teacher's per-block risk (kept off the attack records)
    risk_records: Annotated[int, Range(ge=2)] = 64
    risk_n: PositiveInt = 2  # perturbations per block for that risk


@dataclass
class AuditConfig:
    name: str = "default"
    seed: NonNegativeInt = 0  # numpy's generators take no negative seed
    device: str | None = None  # cpu, cuda, cuda:1 ... (None: cuda when available)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    students: StudentsConfig = field(default_factory=StudentsConfig)
    attacks: AttacksConfig = field(default_factory=AttacksConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)
    defenses: DefensesConfig = field(default_factory=DefensesConfig)
    redact: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls, values: dict, path: str):
    """Instantiate a config dataclass from a dict, refusing unknown keys with the key path and valid keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key {where!r}{_suggest(str(key), known)}; "
                              f"valid keys here: {', '.join(known)}")
        sub = known[key].type
        nested = {"DataConfig": DataConfig, "TeacherConfig": TeacherConfig, "StudentsConfig": StudentsConfig,
                  "AttacksConfig": AttacksConfig, "MemorizationConfig": MemorizationConfig,
                  "AblationsConfig": AblationsConfig, "DefensesConfig": DefensesConfig}.get(str(sub))
        kwargs[key] = _build(nested, value, where) if nested else value
    return cls(**kwargs)


def _check_choices(values, choices, where: str) -> None:
    for v in values:
        if v not in choices:
            raise ConfigError(f"{where}: unknown value {v!r}{_suggest(str(v), choices)}; "
                              f"choose from {', '.join(choices)}")


def validate(cfg: AuditConfig) -> AuditConfig:
    """Every field's type and range (from its annotation), then names, combinations and the device."""
    from kdfast.reference import KINDS

    check_config(cfg, ConfigError)
    check_device(cfg.device, "device (--device)", ConfigError)
    _check_choices(cfg.ablations.divergence, KINDS, "ablations.divergence")
    _check_choices(cfg.attacks.attacks, audit_attacks(), "attacks.attacks")
    if not cfg.students.techniques and not cfg.students.control:
        raise ConfigError("students: no techniques and no control: nothing to audit; list at least one technique")
    if not cfg.students.sizes:
        raise ConfigError("students.sizes is empty; give at least one size, e.g. {small: [0, 10, 20, 29]}")
    for name, spec in cfg.students.sizes.items():
        if not (isinstance(spec, str) or isinstance(spec, list) and spec and all(isinstance(i, int) for i in spec)):
            raise ConfigError(f"students.sizes.{name}: give a list of teacher layer indices or a model id, "
                              f"got {spec!r}")
    if "ref_second" in cfg.attacks.attacks and not cfg.attacks.ref_second:
        cfg.attacks.attacks = [a for a in cfg.attacks.attacks if a != "ref_second"]
    if cfg.data.max_prompt_len >= cfg.data.max_len:
        raise ConfigError(f"data.max_prompt_len ({cfg.data.max_prompt_len}) must be below "
                          f"data.max_len ({cfg.data.max_len})")
    _check_student_settings(cfg)
    _check_teacher_topk(cfg)
    from kdfast.audit.defenses import check_defenses

    check_defenses(cfg)
    return cfg


def student_settings(cfg: AuditConfig, technique: str, overrides: dict | None = None) -> dict:
    """The DistillConfig fields of one student: the students' common settings, then `distill`, then the
    technique's `per_technique` entry, then `overrides` (an ablation's)."""
    s = cfg.students
    return {"lr": s.lr, "epochs": s.epochs, "batch_size": s.batch_size, "max_len": cfg.data.max_len,
            "max_prompt_len": cfg.data.max_prompt_len, "long_prompts": cfg.data.long_prompts, "seed": cfg.seed,
            **s.distill,
            **s.per_technique.get(technique, {}), "technique": technique, **(overrides or {})}


def _check_student_settings(cfg: AuditConfig) -> None:
    """Build every technique's DistillConfig now, so a bad value fails before the teacher trains for an hour."""
    from kdfast.distill.config import DistillConfig, DistillError

    for tech in [CONTROL] * cfg.students.control + list(cfg.students.techniques):
        key = f"students.per_technique.{tech}" if tech in cfg.students.per_technique else "students.distill"
        try:
            DistillConfig.from_dict(student_settings(cfg, tech))
        except DistillError as e:
            raise ConfigError(f"{key} (or students.lr/epochs/batch_size) for {tech}: {e}") from None


def _check_teacher_topk(cfg: AuditConfig) -> None:
    """The cached-teacher KD students' settings train from a cache (kd's own settings may not, e.g. lm_records)."""
    from kdfast.distill.config import DistillConfig, DistillError

    if not cfg.ablations.teacher_topk:
        return
    try:
        DistillConfig.from_dict(student_settings(cfg, "kd", {"teacher_cache": "cache"}))
    except DistillError as e:
        raise ConfigError(f"ablations.teacher_topk: the KD settings (students.distill / per_technique.kd) cannot "
                          f"train from a teacher cache: {e}") from None


def check_teacher_topk_vocab(cfg: AuditConfig, vocab: int) -> None:
    """Every k of ablations.teacher_topk fits the teacher's vocabulary (known once its tokenizer is loaded)."""
    too_big = [k for k in cfg.ablations.teacher_topk if k > vocab]
    if too_big:
        raise ConfigError(f"ablations.teacher_topk: k={too_big[0]} exceeds the teacher's vocabulary ({vocab} "
                          f"tokens); give each k from 1 to {vocab}")


def preset(name: str) -> AuditConfig:
    """A named configuration: the embedded default, the CI-sized tiny run, or the paper's settings."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; choose from {', '.join(PRESETS)}")
    from kdfast.audit import presets

    return validate(presets.PRESETS[name]())


def load_config(path: str | Path | None = None, preset_name: str | None = None,
                overrides: dict | None = None) -> AuditConfig:
    """A preset with a YAML file's keys and `overrides` laid over it, validated.

    The preset is `preset_name`, else the file's `preset:` key, else "default".
    """
    layer = _read_yaml(path) if path else {}
    base = preset(preset_name or layer.pop("preset", None) or "default").to_dict()
    layer.pop("preset", None)
    for extra in layer, overrides or {}:
        base = _merge(base, extra)
    return validate(_build(AuditConfig, base, ""))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 as a string; read it, as YAML 1.2 does, as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def read_yaml(text: str):
    """A YAML document with numbers read as YAML 1.2 reads them (1e-3 is a float)."""
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def _merge(base: dict, layer: dict) -> dict:
    """`layer` over `base`, key by key; `sizes` and `fields` are replaced whole (they list what there is, where
    a preset's entries left in would be a surprise), settings such as `per_technique.minillm` are merged."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("sizes", "fields"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
