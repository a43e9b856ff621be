"""DistillConfig: every knob of the trainer, working defaults per technique (docs/design.md §7), early validation."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from kdfast.data.encode import LONG_PROMPTS
from kdfast.distill.optim import MASTER_WEIGHTS, OPTIMIZERS
from kdfast.lora import DEFAULT_TARGETS as LORA_TARGETS
from kdfast.losses import VOCAB_POLICIES
from kdfast.models import QUANTIZATIONS
from kdfast.reference import KINDS, SPARSE_TAILS
from kdfast.validation import choices

TECHNIQUES = ("sft", "kd", "seqkd", "imitkd", "gkd", "minillm", "distillm")
CROSS_KINDS = ("uld",)  # losses for a teacher with another tokenizer (kdfast.distill.cross)
LOSSES = KINDS + CROSS_KINDS
ALIGNMENTS = ("spans", "positions")
SCHEDULERS = ("cosine", "constant", "linear")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
STUDENT_QUANTIZATIONS = ("nf4",)  # QLoRA: the student's frozen base in bitsandbytes NF4 under its LoRA adapters

# What `None` means for each technique; anything set explicitly wins. Sources: docs/design.md §7, the MiniLLM/DistiLLM
# reference scripts (GPT-2: lr 5e-4 for students of GPT-2 base size; here 5e-5, the safer default for larger ones).
_COMMON = dict(lr=5e-5, epochs=3, weight_decay=0.01, adam_betas=(0.9, 0.999), lr_scheduler="cosine", warmup_steps=0,
               loss="fkl", kd_ratio=1.0, student_gen_fraction=0.0, buffer_size=0, disable_dropout=False,
               lm_kd_ratio=0.0)
TECHNIQUE_DEFAULTS: dict[str, dict] = {
    "sft": dict(_COMMON, epochs=5, kd_ratio=0.0),
    "kd": dict(_COMMON),
    "seqkd": dict(_COMMON),
    "imitkd": dict(_COMMON, student_gen_fraction=1.0, buffer_size=1000),
    "gkd": dict(_COMMON, loss="jsd", student_gen_fraction=0.5),
    # DistiLLM's adaptive schedule decides the fraction (student_gen_fraction=None keeps it adaptive).
    "distillm": dict(_COMMON, loss="srkl", student_gen_fraction=None, buffer_size=1000),
    # MiniLLM's reference: AdamW(0.9, 0.95), weight decay 1e-6, constant lr 5e-6 after 100 warm-up steps,
    # no dropout during RL, pretraining-text term = 0.5·CE + 0.5·KD.
    "minillm": dict(_COMMON, lr=5e-6, weight_decay=1e-6, adam_betas=(0.9, 0.95), lr_scheduler="constant",
                    warmup_steps=100, loss="rkl", disable_dropout=True, lm_kd_ratio=0.5),
}


class DistillError(ValueError):
    """A configuration or input the trainer cannot use: names the problem and the fix."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class DistillConfig:
    """Settings of one distillation run. Fields left at None take the technique's default (docs/design.md §7).

    Batch sizes count sequences: `batch_size` per process and micro-batch; the global batch of one optimizer
    step is batch_size × grad_accum × processes. Losses are averaged over the valid (response) tokens of the
    whole global batch.
    """

    technique: Literal[TECHNIQUES] = _help("one of sft, kd, seqkd, imitkd, gkd, minillm, distillm", default="kd")
    # optimisation
    lr: float | None = _help("peak learning rate (sft/kd/...: 5e-5, minillm: 5e-6)", default=None)
    epochs: float | None = _help("passes over the training records (sft: 5, others: 3)", default=None)
    max_steps: int | None = _help("optimizer steps; overrides epochs", default=None)
    batch_size: int = _help("sequences per micro-batch and process", default=8)
    grad_accum: int = _help("micro-batches accumulated per optimizer step", default=1)
    weight_decay: float | None = _help("AdamW weight decay (0.01; minillm 1e-6)", default=None)
    adam_betas: tuple[float, float] | None = _help("AdamW betas ((0.9, 0.999); minillm (0.9, 0.95))", default=None)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    lr_scheduler: Literal[SCHEDULERS] | None = _help("cosine, constant or linear, after linear warm-up", default=None)
    warmup_steps: int | None = _help("linear warm-up steps (0; minillm 100)", default=None)
    max_grad_norm: float | None = _help("gradient clipping norm (None: off)", default=1.0)
    seed: int = _help("seed of data order, sampling and initial RNG state", default=0)
    bf16: bool | None = _help("bf16 autocast (None: on for CUDA devices that support it)", default=None)
    fp16: bool = _help("fp16 autocast with loss scaling", default=False)
    disable_dropout: bool | None = _help("zero the student's dropout while training (minillm: yes)", default=None)
    lora_rank: int = _help("train LoRA adapters of this rank on lora_targets only (0: every parameter)", default=0)
    lora_alpha: float | None = _help("LoRA updates are scaled by lora_alpha / lora_rank (None: lora_rank)",
                                     default=None)
    lora_targets: str = _help("comma-separated endings of the module names that get LoRA adapters",
                              default=LORA_TARGETS)
    # data
    max_len: int = _help("longest prompt + response in tokens; responses are cut to fit", default=512)
    max_prompt_len: int | None = _help("longest prompt in tokens (None: max_len // 2, 256 for 512)", default=None)
    long_prompts: Literal[LONG_PROMPTS] = _help(
        "a prompt over max_prompt_len: truncate (keep its end, next to the response), drop the record, or error",
        default="truncate")
    # divergence
    loss: Literal[LOSSES] | None = _help(
        "divergence kind: fkl, rkl, jsd, skl, srkl, tvd (kd: fkl, gkd: jsd, distillm: srkl)", default=None)
    kd_ratio: float | None = _help("r in r·divergence + (1 − r)·cross-entropy (1.0; sft: 0)", default=None)
    beta: float = _help("generalized-JSD β (0.1 as DistiLLM's code; TRL's GKD uses 0.5)", default=0.1)
    skew_alpha: float = _help("α of the skew divergences skl/srkl", default=0.1)
    temperature: float = _help("softmax temperature of both models in the divergence", default=1.0)
    fused: bool = _help("fused-linear divergence from hidden states (False: materialized logits)", default=True)
    vocab: Literal[VOCAB_POLICIES] = _help(
        "teacher/student vocabulary mismatch: 'error' or 'intersect' (common prefix)", default="error")
    chunk_size: int | None = _help("token chunk of the fused-linear op (None: its default)", default=None)
    # student generation
    student_gen_fraction: float | None = _help(
        "probability that a micro-batch is student-generated (kd: 0, gkd: λ=0.5, imitkd: 1, distillm: adaptive)",
        default=None)
    buffer_size: int | None = _help("replay buffer of generated sequences (imitkd/distillm: 1000, 0: off)",
                                    default=None)
    max_new_tokens: int | None = _help("longest generated response (None: up to max_len)", default=None)
    gen_temperature: float = _help("sampling temperature of student/teacher generation", default=1.0)
    gen_top_k: int = _help("top-k of generation (0: off)", default=0)
    gen_top_p: float = _help("top-p of generation (1: off)", default=1.0)
    gen_batch_size: int | None = _help("generation batch (None: batch_size)", default=None)
    # seqkd
    seqkd_cache: str | None = _help("folder of cached teacher generations (None: <out>/seqkd-cache)", default=None)
    # distillm
    init_threshold: float = _help("DistiLLM: initial probability of student generation", default=0.0)
    threshold_step: float = _help("DistiLLM: threshold increase when validation loss rises", default=0.1)
    loss_eps: float = _help("DistiLLM: validation-loss rise that triggers an increase", default=0.1)
    replay_ratio: Literal[REPLAY_RATIOS] = _help(
        "DistiLLM: fresh-sample share over time: decreasing, constant, increasing", default="decreasing")
    # minillm
    mix_alpha: float = _help("MiniLLM: teacher share α of the sampling mixture (1 − α)q + αp", default=0.2)
    ppo_epochs: int = _help("MiniLLM: passes over each set of rollouts", default=4)
    num_rollouts: int = _help("MiniLLM: rollouts per collection, all processes together", default=256)
    clip_range: float = _help("MiniLLM: PPO ratio clip", default=0.2)
    gamma: float = _help("MiniLLM: reward discount", default=0.95)
    reward_scaling: float = _help("MiniLLM: rewards are divided by this", default=0.5)
    reward_clip: float = _help("MiniLLM: rewards are clipped to ±this", default=100.0)
    length_norm: bool = _help("MiniLLM: divide the return by the remaining length", default=True)
    whiten: bool = _help("MiniLLM: whiten advantages over each rollout set", default=True)
    single_step_reg: bool = _help("MiniLLM: add the single-step reverse-KL term", default=True)
    # pretraining-text term
    lm_coef: float = _help("weight of the loss on lm_records (pretraining text), when given", default=1.0)
    lm_kd_ratio: float | None = _help("r of r·KD + (1 − r)·CE on lm_records (minillm: 0.5, others: 0)",
                                      default=None)
    # run
    out: str | None = _help("output folder: checkpoints, metrics, final student", default=None)
    save_every: int | None = _help("checkpoint every N steps (None: only at the end)", default=500)
    keep_checkpoints: int = _help("checkpoints kept on disk (older ones are deleted)", default=2)
    eval_every: int | None = _help("evaluate every N steps (None: once per epoch, when eval records are given)",
                                   default=None)
    resume: bool = _help("continue from the latest checkpoint in `out`", default=False)
    device: str | None = _help("student device (None: cuda when available; accelerate decides under launch)",
                               default=None)
    teacher_device: str | None = _help("teacher device (None: the student's)", default=None)
    teacher_dtype: Literal[TEACHER_DTYPES] | None = _help(
        "teacher dtype: auto (bf16 on CUDA), float32, bfloat16, float16, or None (keep)", default="auto")
    progress: bool = _help("show a progress bar and a final summary", default=True)
    # cross-tokenizer distillation (loss="uld" with a teacher_tokenizer that differs from the student's)
    uld_top_k: int | None = _help("ULD: compare only the k largest sorted probabilities (None: all)", default=None)
    alignment: Literal[ALIGNMENTS] = _help(
        "cross-tokenizer alignment of response tokens: spans (shared character boundaries, merged tokens) or positions"
        " (the i-th token of each)", default="spans")
    # memory (`kdfast plan` predicts what each saves)
    gradient_checkpointing: bool = _help("recompute the student's blocks in backward (non-reentrant): activations "
                                         "of the block inputs only, about 30% more compute", default=False)
    teacher_quantize: Literal[QUANTIZATIONS] | None = _help(
        "load the frozen teacher through bitsandbytes: nf4 or int8 (None: off); its LM head stays unquantized",
        default=None)
    student_quantize: Literal[STUDENT_QUANTIZATIONS] | None = _help(
        "QLoRA: hold the student's frozen base in bitsandbytes nf4 under its fp32 LoRA adapters (needs lora_rank; the"
        " LM head stays unquantized; the Distiller trains a quantized copy of a student given unquantized)",
        default=None)
    optim: Literal[OPTIMIZERS] = _help(
        "adamw (torch), adamw_8bit, paged_adamw_8bit (bitsandbytes) or adafactor (transformers)", default="adamw")
    master_weights: Literal[MASTER_WEIGHTS] = _help(
        "fp32 (weights fp32, bf16/fp16 autocast) or bf16 (pure bf16 student: weights, grads and optimizer states; half"
        " the memory, updates below bf16's resolution are lost)", default="fp32")
    # training from cached teacher logits (kdfast cache-teacher; kdfast/distill/teacher_cache.py)
    teacher_cache: str | None = _help("folder of cached top-k teacher log-probs (kdfast cache-teacher): train with "
                                      "no teacher loaded (kd; gkd/distillm with student_gen_fraction=0; seqkd "
                                      "from a --seqkd capture)",
                                      default=None)
    teacher_cache_tail: Literal[SPARSE_TAILS] = _help(
        "how the cached top-k meets the student's softmax: bucket (top-k + the rest, every loss) or renorm (teacher "
        "renormalized over its top-k, fkl only)", default="bucket")

    def __post_init__(self):
        _choice("technique", self.technique, TECHNIQUES)
        for name, value in TECHNIQUE_DEFAULTS[self.technique].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.adam_betas is not None:
            self.adam_betas = tuple(self.adam_betas)
        if self.max_prompt_len is None and self.max_len >= 2:
            self.max_prompt_len = self.max_len // 2
        self._validate()

    def _validate(self) -> None:
        self._check_types()
        for name, allowed in choice_fields().items():
            _choice(name, getattr(self, name), allowed)
        self._check_cross()
        if self.student_quantize and not self.lora_rank:
            raise DistillError(f"student_quantize={self.student_quantize!r} freezes the student's base weights: only "
                               "LoRA adapters can train on it; set lora_rank (--lora-rank N) or unset "
                               "student_quantize (--student-quantize)")
        if self.student_quantize and self.master_weights == "bf16":
            raise DistillError("student_quantize keeps the adapters in fp32 over a quantized base, which cannot be "
                               "cast to bf16: drop master_weights='bf16' (--master-weights) or student_quantize")
        if self.master_weights == "bf16" and self.fp16:
            raise DistillError("master_weights='bf16' trains a bf16 student; fp16 autocast cannot run on it: "
                               "drop fp16 (--fp16) or use --master-weights fp32")
        for name in ("batch_size", "grad_accum", "max_len", "ppo_epochs", "num_rollouts", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise DistillError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "eval_every", "max_new_tokens", "gen_batch_size", "max_prompt_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DistillError(f"{name} must be at least 1 (or None), got {value}")
        for name in ("kd_ratio", "lm_kd_ratio", "beta", "skew_alpha", "mix_alpha", "init_threshold", "gamma"):
            _unit(name, getattr(self, name))
        if self.student_gen_fraction is not None:
            _unit("student_gen_fraction", self.student_gen_fraction)
        for name in ("lr", "temperature", "gen_temperature", "reward_scaling", "reward_clip", "clip_range",
                     "adam_eps", "gen_top_p"):
            if not getattr(self, name) > 0:
                raise DistillError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.epochs is not None and self.epochs > 0) and self.max_steps is None:
            raise DistillError(f"epochs must be positive (or set max_steps), got {self.epochs}")
        if self.max_prompt_len is not None and self.max_prompt_len >= self.max_len:
            raise DistillError(f"max_prompt_len={self.max_prompt_len} leaves no room for a response under "
                               f"max_len={self.max_len}; lower max_prompt_len or raise max_len (--max-prompt-len, "
                               "--max-len)")
        if self.bf16 and self.fp16:
            raise DistillError("bf16 and fp16 are both on; choose one")
        if self.buffer_size < 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.lora_rank < 0:
            raise DistillError("buffer_size, warmup_steps, weight_decay and lora_rank must not be negative")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise DistillError(f"lora_alpha must be positive or None, got {self.lora_alpha}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise DistillError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise DistillError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.technique == "sft" and (self.kd_ratio or self.student_gen_fraction or self.lm_kd_ratio):
            raise DistillError("sft trains without a teacher: kd_ratio, lm_kd_ratio and student_gen_fraction "
                               "must be 0 (to distill, --technique kd)")
        _check_teacher_cache(self)

    def _check_cross(self) -> None:
        if self.uld_top_k is not None and self.uld_top_k < 1:
            raise DistillError(f"uld_top_k must be at least 1 (or None: all entries), got {self.uld_top_k}")
        if self.loss not in CROSS_KINDS:
            return
        if self.technique == "minillm":
            raise DistillError("minillm cannot use loss='uld': its sampling mixture (1 − α)q + αp and its rewards "
                               "log p − log q need the teacher's probability of each student token (one vocabulary); "
                               "across tokenizers use kd, seqkd, gkd, imitkd or distillm")
        if self.lm_kd_ratio:
            raise DistillError("lm_kd_ratio > 0 distills pretraining text with a same-vocabulary divergence; with "
                               "loss='uld' set lm_kd_ratio=0 (--lm-kd-ratio 0; the text term is then plain "
                               "cross-entropy)")

    def _check_types(self) -> None:
        """A number given as text (a YAML or JSON slip) fails here, naming the field, not later in a comparison."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), str(f.type)
            numeric = ("int" in kinds or "float" in kinds) and "str" not in kinds
            if numeric and (isinstance(value, str) or isinstance(value, bool) and "bool" not in kinds):
                raise DistillError(f"{f.name} must be a number, got {value!r}")

    @property
    def needs_teacher(self) -> bool:
        return self.technique != "sft" and self.teacher_cache is None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DistillConfig":
        """A config from a plain dict (a JSON file, a saved run); unknown keys raise with the closest names."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            text = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise DistillError(f"unknown DistillConfig field(s): {text}")
        return cls(**values)


@functools.cache
def choice_fields() -> dict[str, tuple]:
    """{field: the values it takes} of every DistillConfig field annotated with a Literal (None where optional): the
    one list each, which the config checks and `kdfast distill` offers as the flag's choices."""
    hints = typing.get_type_hints(DistillConfig)
    return {f.name: allowed for f in dataclasses.fields(DistillConfig) if (allowed := choices(hints[f.name]))}


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        shown = ", ".join(str(c) for c in allowed if c is not None)
        raise DistillError(f"unknown {name} {value!r}; choose one of {shown}" + (" (or None)" * (None in allowed)))


def _unit(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise DistillError(f"{name} must lie in [0, 1], got {value}")


def _check_teacher_cache(cfg: DistillConfig) -> None:
    """A cache holds the teacher on the records' own responses (seqkd: on its samples, a --seqkd capture, checked
    where the cache is opened): no technique may ask it about other sequences."""
    if cfg.teacher_cache is None:
        return
    if cfg.teacher_cache_tail == "renorm" and cfg.loss != "fkl":
        raise DistillError(f"teacher_cache_tail='renorm' supports loss='fkl' only (got {cfg.loss!r}); use "
                           "--teacher-cache-tail bucket")
    if cfg.technique in ("sft", "imitkd", "minillm"):
        why = "sft uses no teacher" if cfg.technique == "sft" else "it needs the teacher on student-generated sequences"
        raise DistillError(f"technique {cfg.technique!r} cannot train from teacher_cache: {why}; cached training "
                           "supports kd, gkd, distillm and seqkd (from a `kdfast cache-teacher --seqkd` capture)")
    if cfg.student_gen_fraction != 0:
        shown = "adaptive (None)" if cfg.student_gen_fraction is None else cfg.student_gen_fraction
        raise DistillError(f"teacher_cache holds the teacher on the records' responses only, but "
                           f"student_gen_fraction is {shown} (gkd's default is 0.5, distillm's adaptive): set "
                           f"student_gen_fraction=0 (--student-gen-fraction 0) to train on the ground-truth batches")
    if cfg.lm_kd_ratio:
        raise DistillError("teacher_cache does not cover lm_records: set lm_kd_ratio=0 (--lm-kd-ratio 0)")
