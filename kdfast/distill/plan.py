"""Memory of one distillation step predicted from the two models' configs (no weights), and the levers that fit it.

The model: parameters are counted on a meta-device instance of each config (exact, any HF family);
bytes per parameter follow the levers; activations are the tensors each block saves for backward, per token,
from the block's widths; the loss workspace is the fused op's chunk (or the materialized logits). The peak is
static memory plus the larger of the forward peak (activations + teacher forward + loss workspace) and the
backward/optimizer peak (gradients + optimizer temporaries). benchmarks/bench_distill_memory.py checks it.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdfast.distill.config import STUDENT_QUANTIZATIONS
from kdfast.distill.optim import MASTER_WEIGHTS, OPTIMIZERS
from kdfast.lora import DEFAULT_TARGETS as LORA_TARGETS
from kdfast.memory import peak_bytes, resident_bytes
from kdfast.models import QUANTIZATIONS, ModelError, local_path, tiny_config
from kdfast.runtime import DIVERGENCE_CHUNK_ELEMENTS, FUSED_LINEAR_CPU_CHUNK_BYTES, FUSED_LINEAR_GPU_CHUNK_BYTES

GB = 1 << 30
# CUDA context, cuBLAS workspaces and allocator slack on a GPU (measured: ~0.5-0.9 GB on an H100/H200).
CUDA_RESERVE = 768 << 20
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 (double quant) + fp32 per 256 absmax
BNB_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
# The levers in the order of their cost to speed or accuracy (cheapest first), as `plan` suggests them.
LEVERS = ({"optim": "adamw_8bit"}, {"gradient_checkpointing": True}, {"teacher_quantize": "int8"},
          {"teacher_quantize": "nf4"}, {"master_weights": "bf16"}, {"lora_rank": 16},
          {"lora_rank": 16, "student_quantize": "nf4"})
PART_NAMES = {"teacher_weights": "teacher weights", "student_weights": "student weights",
              "gradients": "student gradients", "optimizer": "optimizer states", "activations": "student activations",
              "loss_workspace": "logits / loss workspace", "teacher_forward": "teacher forward workspace",
              "optimizer_step": "optimizer step temporaries", "recompute": "recomputed block (checkpointing)",
              "reserve": "framework reserve"}
STATIC = ("teacher_weights", "student_weights", "optimizer", "reserve")


@dataclass
class MemoryPlan:
    """Predicted peak of one training step: `parts` in bytes (the peak's terms), their sum `total_bytes`.

    Beside the static parts, only one phase is resident at the peak: the forward's (activations, loss workspace,
    teacher forward) or the backward's (gradients with the optimizer step's temporaries or, under checkpointing,
    the kept block inputs and the block being recomputed); `total_bytes` counts the larger (see `phase`).
    """

    parts: dict[str, int]
    settings: dict
    phase: str
    budget: int | None = None
    suggestion: dict | None = None
    suggestion_bytes: int | None = None
    params: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts[k] for k in STATIC) + max(_phases(self.parts).values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total_bytes <= self.budget

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "parts": dict(self.parts), "phase": self.phase,
                "settings": self.settings, "params": self.params, "budget_bytes": self.budget, "fits": self.fits,
                "suggestion": self.suggestion, "suggestion_bytes": self.suggestion_bytes}

    def table(self) -> str:
        """The parts as a text table with totals, the budget verdict and the suggested levers."""
        at_peak = _phase_parts(self.parts)[self.phase] + STATIC
        lines = [f"{'part':<34} {'GB':>8}"]
        for key, value in self.parts.items():
            mark = "  (not at the peak)" if key not in at_peak and value else ""
            lines.append(f"{PART_NAMES[key]:<34} {value / GB:>8.2f}{mark}")
        lines.append(f"{'peak (' + self.phase + ')':<34} {self.total_bytes / GB:>8.2f}")
        if self.budget is not None:
            verdict = "fits" if self.fits else "does not fit"
            lines.append(f"budget {self.budget / GB:.2f} GB: {verdict}")
            if not self.fits and self.suggestion:
                lines.append(f"levers that fit: {_describe(self.suggestion)} ({self.suggestion_bytes / GB:.2f} GB)")
            elif not self.fits:
                lines.append("no combination of levers fits this budget; lower batch_size or seq_len")
        return "\n".join(lines)


def _phase_parts(parts: dict[str, int]) -> dict[str, tuple[str, ...]]:
    """The parts resident at each phase's peak: the teacher's forward runs before the loss, not beside it."""
    forward = ("activations", "teacher_forward" if parts["teacher_forward"] > parts["loss_workspace"]
               else "loss_workspace")
    backward = ("gradients", "activations", "recompute") if parts["recompute"] > parts["optimizer_step"] \
        else ("gradients", "optimizer_step")
    return {"forward": forward, "backward": backward}


def _phases(parts: dict[str, int]) -> dict[str, int]:
    return {phase: sum(parts[k] for k in keys) for phase, keys in _phase_parts(parts).items()}


def load_config(spec: str):
    """The config of anything load_model takes (tiny:<family>, a folder, a config.json, a hub id), no weights."""
    from transformers import AutoConfig

    spec = str(spec)
    if spec.startswith("tiny:"):
        return tiny_config(spec.split(":", 1)[1])
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values) if "model_type" in values else \
            _fail(f"{path} has no model_type; give an HF config.json")
    try:
        return AutoConfig.from_pretrained(str(local_path(spec) or spec))
    except OSError as e:
        raise ModelError(f"could not read the config of {spec!r} (offline? give a local folder or config.json): "
                         f"{e}") from e


def _fail(message: str):
    raise ModelError(message)


def plan_memory(teacher_config, student_config, *, batch_size: int = 1, seq_len: int = 2048,
                teacher_quantize: str | None = None, optim: str = "adamw", gradient_checkpointing: bool = False,
                lora_rank: int = 0, lora_targets: str = LORA_TARGETS, master_weights: str = "fp32",
                student_quantize: str | None = None, fused: bool = True, device: str = "cuda",
                autocast: bool | None = None, disable_dropout: bool = False, target_fraction: float = 1.0,
                budget: int | str | None = None) -> MemoryPlan:
    """The predicted peak memory of one distillation step (a MemoryPlan), from HF configs only.

    teacher_config / student_config: transformers configs, dicts (with model_type) or what load_config takes
    (tiny:<family>, a folder, a config.json, a hub id); teacher_config None: sft.
    batch_size × seq_len tokens per micro-batch, of which target_fraction are loss targets (response tokens; the
    default 1.0 is an upper bound on the loss part: with prompts, set the response share). device "cuda" (bf16
    autocast, bf16 teacher, CUDA reserve) or "cpu" (fp32 throughout, no reserve, as the trainer does there).
    disable_dropout: the trainer's setting of that name (dropout saves masks, and attention dropout makes SDPA save
    every head's [T, T] probabilities). budget: bytes or text like "24GB"; when given and not met, the cheapest
    lever set that fits is suggested. student_quantize "nf4" (with lora_rank): the QLoRA student, its blocks'
    linear weights in NF4 under fp32 adapters.
    """
    settings = dict(batch_size=batch_size, seq_len=seq_len, teacher_quantize=teacher_quantize, optim=optim,
                    gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank, lora_targets=lora_targets,
                    master_weights=master_weights, student_quantize=student_quantize, fused=fused, device=device,
                    autocast=autocast,
                    disable_dropout=disable_dropout, target_fraction=target_fraction)
    _check_settings(settings)
    teacher = None if teacher_config is None else _shape(_as_config(teacher_config), lora_targets)
    student = _shape(_as_config(student_config), lora_targets)
    plan = _plan(teacher, student, settings)
    plan.budget = parse_bytes(budget) if budget is not None else None
    if plan.fits is False:
        plan.suggestion, plan.suggestion_bytes = _cheapest_fit(teacher, student, settings, plan.budget)
    return plan


def parse_bytes(text: int | str) -> int:
    """24GB, 24 GiB, 16000MB, 1.5e9 -> bytes (GB and GiB both mean 2^30, as GPU cards are labelled)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b?)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot read the memory budget {text!r}; write it like 24GB or 16000MB")
    unit = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get((m.group(2) or "b")[0], 1)
    return int(float(m.group(1)) * unit)


# --- shapes -----------------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    """What the arithmetic needs of one model: parameter counts by kind and the block widths."""

    hidden: int
    layers: int
    inter: int
    heads: int
    kv_dim: int
    vocab: int
    gated: bool
    block_linear: int        # weights of the blocks' linear layers (what bitsandbytes quantizes)
    other: int               # embeddings, norms, biases, head
    head: int                # the output head's weight (0 when tied to the embeddings)
    big_tensors: int         # parameters in tensors of >= 4096 elements
    largest: int             # elements of the largest parameter tensor
    lora: int                # LoRA adapter parameters at rank 1 (scale by the rank)
    matrix_rows_cols: int    # sum of rows + cols over the matrices (Adafactor's factored state)
    vectors: int             # parameters in 1-D tensors
    act_extra: int = 0       # [tokens, inter] tensors an activation written as a formula saves (GPT-2's gelu_new)
    act_shared: int = 0      # 1 where the activation's backward reads its output, the tensor fc2 saves (ReLU)
    attn_dropout: float = 0.0  # attention dropout: on the CPU, SDPA's math path saves fp32 [B, heads, T, T] x 3
    dropout: float = 0.0     # residual / embedding dropout: a mask of [tokens, hidden] per dropout

    @property
    def total(self) -> int:
        return self.block_linear + self.other


def _as_config(config):
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, dict):
        from transformers import AutoConfig

        values = dict(config)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return config


def _shape(config, lora_targets: str) -> _Shape:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = _blocks(model)
    linear = sum(m.weight.numel() for m in blocks.modules() if _is_linear(m))
    params = list(model.parameters())  # tied weights appear once
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    head_n = 0 if head is None or head.weight is embed.weight else head.weight.numel()
    suffixes = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    lora = sum(_in_out(m) for name, m in model.named_modules() if name.endswith(suffixes) and _is_linear(m))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    inter = (getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None)
             or getattr(text, "n_inner", None) or 4 * hidden)
    gated = any(n.endswith("gate_proj") for n, _ in blocks.named_modules())
    return _Shape(hidden=hidden, layers=len(blocks), inter=inter, heads=heads, kv_dim=kv * (hidden // heads),
                  vocab=text.vocab_size, gated=gated, block_linear=linear,
                  other=sum(p.numel() for p in params) - linear, head=head_n,
                  big_tensors=sum(p.numel() for p in params if p.numel() >= BNB_MIN_8BIT),
                  largest=max(p.numel() for p in params), lora=lora,
                  matrix_rows_cols=sum(sum(p.shape) for p in params if p.ndim >= 2),
                  vectors=sum(p.numel() for p in params if p.ndim < 2),
                  act_extra=3 if getattr(text, "activation_function", None) in ("gelu_new", "gelu_fast") else 0,
                  act_shared=int(getattr(text, "activation_function", None) == "relu"),
                  attn_dropout=_rate(text, "attn_pdrop", "attention_dropout"),
                  dropout=_rate(text, "resid_pdrop", "dropout", "hidden_dropout"))


def _rate(config, *names: str) -> float:
    return next((float(v) for v in (getattr(config, n, None) for n in names) if isinstance(v, (int, float))), 0.0)


def _blocks(model: nn.Module) -> nn.ModuleList:
    from kdfast.models import transformer_blocks

    return transformer_blocks(model)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # GPT-2's linears are Conv1D


def _in_out(m: nn.Module) -> int:
    rows, cols = m.weight.shape
    return rows + cols


# --- arithmetic -------------------------------------------------------------------------------------------------


def _plan(teacher: _Shape | None, student: _Shape, s: dict) -> MemoryPlan:
    cuda = s["device"] != "cpu"
    half = s["autocast"] if s["autocast"] is not None else cuda  # the trainer's bf16 default
    e = 2 if half or s["master_weights"] == "bf16" else 4      # bytes of a compute-dtype activation
    w = 2 if s["master_weights"] == "bf16" else 4              # bytes of a student parameter
    tokens = s["batch_size"] * s["seq_len"]
    trainable = s["lora_rank"] * student.lora if s["lora_rank"] else student.total
    parts = dict.fromkeys(PART_NAMES, 0)
    if teacher is not None:
        parts["teacher_weights"] = _weight_bytes(teacher, s["teacher_quantize"], 2 if cuda else 4)
        parts["teacher_forward"] = _teacher_forward(teacher, tokens, 2 if cuda or s["teacher_quantize"] else 4)
    adapters = trainable * w if s["lora_rank"] else 0
    parts["student_weights"] = _weight_bytes(student, s["student_quantize"], w) + adapters
    parts["gradients"] = trainable * w
    parts["optimizer"] = _optimizer_bytes(student, trainable, s, w)
    parts["optimizer_step"] = _optimizer_step(student, trainable, s)
    parts["activations"] = _activations(student, s, tokens, e, w)
    if s["gradient_checkpointing"]:
        r = max(e, w) if s["master_weights"] == "fp32" else 2
        parts["recompute"] = _block_saved(student, s, e, r)
    n_targets = max(1, round(tokens * s["target_fraction"]))
    parts["loss_workspace"] = _loss_workspace(student, teacher, s, tokens, n_targets, e)
    parts["reserve"] = CUDA_RESERVE if cuda else 0
    phases = _phases(parts)
    phase = "forward" if phases["forward"] >= phases["backward"] else "backward"
    params = {"teacher": 0 if teacher is None else teacher.total, "student": student.total, "trainable": trainable}
    return MemoryPlan({k: int(v) for k, v in parts.items()}, s, phase, params=params)


def _weight_bytes(t: _Shape, quantize: str | None, dtype_bytes: int) -> float:
    """A model's weights: the blocks' linear layers quantized as asked (bitsandbytes), the rest in dtype_bytes."""
    if quantize == "nf4":
        return t.block_linear * NF4_BYTES + t.other * dtype_bytes
    if quantize == "int8":
        return t.block_linear * 1 + 4 * t.layers * (4 * t.hidden + 3 * t.inter) / 2 + t.other * dtype_bytes
    return t.total * dtype_bytes


def _block_saved(m: _Shape, s: dict, e: int, r: int) -> float:
    """Bytes one block saves for backward: residual-stream inputs of the two norms in r bytes, the rest in e."""
    h, kv, inter = m.hidden, m.kv_dim, m.inter
    tokens = s["batch_size"] * s["seq_len"]
    attention = 2 * h + h + 2 * kv + (h + kv if m.gated else 0) + h  # norm out, q, k, v, rotary q/k, attn out
    mlp = 4 * inter if m.gated else (2 + m.act_extra - m.act_shared) * inter + h  # gate, up, act, product / fc1, act
    saved = tokens * (2 * h * r + e * (attention + mlp))
    if s["disable_dropout"]:
        return saved
    cpu = s["device"] == "cpu"
    if m.attn_dropout > 0 and cpu:  # fp32 probabilities, mask, dropped probabilities (CUDA's kernels keep a seed)
        saved += 3 * 4 * s["batch_size"] * m.heads * s["seq_len"] ** 2
    if m.dropout > 0:  # after attention and after the MLP; a mask in the compute dtype on the CPU, bool on CUDA
        saved += 2 * tokens * h * (e if cpu else 1)
    return saved


def _activations(m: _Shape, s: dict, tokens: int, e: int, w: int) -> float:
    r = max(e, w) if s["master_weights"] == "fp32" else 2
    per_block = _block_saved(m, s, e, r)
    if s["gradient_checkpointing"]:  # block inputs kept; the block recomputed in backward is part "recompute"
        return m.layers * tokens * m.hidden * r
    return m.layers * per_block + tokens * m.hidden * (r + e)  # + embeddings out, final norm


def _teacher_forward(t: _Shape, tokens: int, e: int) -> float:
    """The teacher's no-grad forward: one block's temporaries (its hidden states kept for the loss count there)."""
    return tokens * e * (3 * t.inter + 4 * t.hidden)


def _loss_workspace(m: _Shape, t: _Shape | None, s: dict, tokens: int, n_targets: int, e: int) -> float:
    """The loss's memory over `n_targets` target tokens of the `tokens` in the micro-batch."""
    V = m.vocab
    if t is None:  # the logits, their fp32 log-softmax and the logits' gradient
        return tokens * V * e + n_targets * V * (e + 8)
    if not s["fused"]:
        # the teacher's forward holds the student's target rows, its own logits and their target rows; the loss
        # holds both models' rows and the gradient the divergence op returns with its loss
        teacher_forward = n_targets * V * e + (tokens + n_targets) * t.vocab * e
        loss = n_targets * (2 * V + t.vocab) * e + _divergence_temporaries(s, n_targets * V, e)
        return max(teacher_forward, loss)
    budget = FUSED_LINEAR_GPU_CHUNK_BYTES if s["device"] != "cpu" else FUSED_LINEAR_CPU_CHUNK_BYTES
    chunk = min(n_targets, max(32, budget // (2 * V * e)))
    head_grad = 0 if s["lora_rank"] else V * m.hidden * 4  # the fp32 d(weight) accumulator
    head_copy = V * m.hidden * e if e != 4 and s["master_weights"] == "fp32" else 0
    # both heads' chunk logits (the student's are overwritten by their gradient)
    workspace = 2 * chunk * V * e + _divergence_temporaries(s, chunk * V, e)
    teacher_hidden = n_targets * t.hidden * (2 if s["device"] != "cpu" or s["teacher_quantize"] else 4)
    return workspace + head_grad + head_copy + n_targets * m.hidden * e + teacher_hidden


def _divergence_temporaries(s: dict, elements: int, e: int) -> float:
    """The torch divergence backend's fp32 temporaries on the CPU: 6 per entry of a sub-chunk of
    DIVERGENCE_CHUNK_ELEMENTS (8 when the logits are not fp32: both models' sub-chunk upcast), and 3 of the first
    sub-chunk still held while the second computes (measured on the op alone at 0.7-3 sub-chunks, fp32 and bf16);
    the Triton kernels keep theirs in registers."""
    if s["device"] != "cpu":
        return 0
    first = min(elements, DIVERGENCE_CHUNK_ELEMENTS)
    second = min(elements - first, DIVERGENCE_CHUNK_ELEMENTS)
    upcast = 2 * first if e != 4 else 0
    return 4 * (upcast + max(6 * first, 6 * second + 3 * first if second else 0))


def _optimizer_bytes(m: _Shape, trainable: int, s: dict, w: int) -> float:
    name = s["optim"]
    if name == "adamw":
        return 2 * trainable * w
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        big = m.big_tensors if not s["lora_rank"] else trainable
        return big * (2 + 8 / 256) + (trainable - min(big, trainable)) * 8
    if s["lora_rank"]:
        return trainable * 4
    return m.matrix_rows_cols * 4 + m.vectors * 4  # adafactor


def _optimizer_step(m: _Shape, trainable: int, s: dict) -> float:
    """Temporaries while the optimizer steps, all of one tensor at a time: two fp32 copies of the largest for the
    for-loop AdamW and Adafactor; on the CPU, bitsandbytes' 8-bit update dequantizes both states and computes in
    fp32, five copies (measured: 540 MiB over SmolLM2's 28.3M-entry embedding); its CUDA kernel updates in place."""
    largest = min(m.largest, trainable)
    if s["optim"] in ("adamw_8bit", "paged_adamw_8bit"):
        return 5 * largest * 4 if s["device"] == "cpu" else 0
    return 2 * largest * 4


def _check_settings(s: dict) -> None:
    if s["optim"] not in OPTIMIZERS:
        raise ValueError(f"unknown optim {s['optim']!r}; choose one of {', '.join(OPTIMIZERS)}")
    if s["teacher_quantize"] not in QUANTIZATIONS + (None,):
        raise ValueError(f"unknown teacher_quantize {s['teacher_quantize']!r}; choose one of "
                         f"{', '.join(QUANTIZATIONS)} (or none)")
    if s["student_quantize"] not in STUDENT_QUANTIZATIONS + (None,):
        raise ValueError(f"unknown student_quantize {s['student_quantize']!r}; choose one of "
                         f"{', '.join(STUDENT_QUANTIZATIONS)} (or none)")
    if s["student_quantize"] and not s["lora_rank"]:
        raise ValueError("student_quantize freezes the student's base: only LoRA adapters train on it; set "
                         "lora_rank (or unset student_quantize)")
    if s["master_weights"] not in MASTER_WEIGHTS:
        raise ValueError(f"unknown master_weights {s['master_weights']!r}; choose one of {', '.join(MASTER_WEIGHTS)}")
    if s["batch_size"] < 1 or s["seq_len"] < 1:
        raise ValueError("batch_size and seq_len must be at least 1")
    if not 0 < s["target_fraction"] <= 1:
        raise ValueError(f"target_fraction must be in (0, 1] (the share of tokens that are loss targets), got "
                         f"{s['target_fraction']}")


def _cheapest_fit(teacher, student, settings: dict, budget: int) -> tuple[dict | None, int | None]:
    """The first lever set (fewest levers, cheapest first) that brings the peak under the budget."""
    options = [lever for lever in LEVERS if not all(settings.get(k) == v for k, v in lever.items())
               and not (teacher is None and "teacher_quantize" in lever)]
    for size in range(1, len(options) + 1):
        for combo in itertools.combinations(options, size):
            merged: dict = {}
            for lever in combo:
                merged.update(lever)
            if len(merged) < sum(len(x) for x in combo):  # two settings of one lever (int8 and nf4)
                continue
            plan = _plan(teacher, student, {**settings, **merged})
            if plan.total_bytes <= budget:
                return merged, plan.total_bytes
    return None, None


def _describe(levers: dict) -> str:
    flags = []
    for key, value in levers.items():
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(flags)


@dataclass
class StepMeasure:
    """One measured training step: bytes resident before it, its peak on top, its time and response tokens."""

    resident: int
    step_peak: int
    seconds: float
    tokens: int

    @property
    def total_bytes(self) -> int:
        return self.resident + self.step_peak


def measure_step(distiller, records: list[dict], warmup: int = 1) -> StepMeasure:
    """The whole-step peak of a Distiller on records, as plan_memory predicts it: teacher, student, optimizer state
    (resident once the warm-up steps allocated it) plus the next step's peak (kdfast.memory.peak_bytes); the time
    is that of one more step, outside the profiler."""
    run = distiller._start(records, None, None)
    for step in range(warmup):
        distiller._step(run, step)
    # the step frees the gradients before its backward; on the CPU the profiler cannot see frees of blocks
    # allocated before it started, so they are freed here and the resident bytes exclude them
    run.optimizer.zero_grad(set_to_none=True)
    resident = resident_bytes(distiller.teacher, distiller.student, run.optimizer)
    peak = peak_bytes(lambda: distiller._step(run, warmup), distiller.device)
    if distiller.device.type == "cuda":
        torch.cuda.synchronize(distiller.device)
    t0 = time.perf_counter()
    metrics = distiller._step(run, warmup + 1)
    if distiller.device.type == "cuda":
        torch.cuda.synchronize(distiller.device)
    return StepMeasure(resident, peak, time.perf_counter() - t0, int(metrics["tokens"]))
