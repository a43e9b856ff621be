"""The shared training loop: data, accumulation over the global token count, LR schedule, clipping, autocast,
accelerate (DDP / FSDP / DeepSpeed), evaluation, checkpoints and resume, progress and the final summary."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from kdfast.data import Encoded
from kdfast.distill.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from kdfast.distill.config import DistillConfig, DistillError
from kdfast.distill.context import RunContext
from kdfast.distill.cross import CrossTokenizer, check_cross_vocab, cross_tokenizer_mode
from kdfast.distill.data import count_targets, encode_texts, encode_training
from kdfast.distill.objective import forward_rows, token_nll, valid
from kdfast.distill.optim import build_optimizer, param_groups
from kdfast.distill.techniques import CLASSES
from kdfast.generation import eval_mode
from kdfast.io import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temporaries
from kdfast.lora import apply_lora, has_lora, merged_state_dict, save_adapter
from kdfast.models import (
    enable_checkpointing,
    import_bitsandbytes,
    is_quantized,
    model_device,
    plain_skeleton,
    quantize_model,
)
from kdfast.runtime import warn_if_bf16_emulated
from kdfast.store import digest

# Config fields that may change when a run resumes (they do not change what the steps compute).
_RESUMABLE = {"epochs", "max_steps", "out", "resume", "save_every", "keep_checkpoints", "eval_every", "progress",
              "device", "teacher_device", "gradient_checkpointing"}


@dataclass
class _Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    history: list[float] = dataclasses.field(default_factory=list)
    eval_loss: float | None = None
    seconds: float = 0.0


@dataclass
class DistillSummary:
    """What a run did: steps, tokens, loss (mean over the last ≤ 10 steps), time; `final` is the saved student."""

    technique: str
    steps: int
    total_steps: int
    tokens: int
    loss: float
    eval_loss: float | None
    seconds: float
    final: str | None
    stopped_early: bool = False

    def __str__(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        lines = [f"distill {self.technique}: {self.steps}/{self.total_steps} steps"
                 + (" (stopped early; --resume, resume=True in Python, continues)" if self.stopped_early else ""),
                 f"  tokens  {self.tokens:,} ({rate:,.0f}/s)", f"  loss    {self.loss:.4f} (mean of the last steps)"]
        if self.eval_loss is not None:
            lines.append(f"  eval    {self.eval_loss:.4f} (student cross-entropy on the eval records)")
        lines.append(f"  time    {self.seconds:.1f} s")
        if self.final:
            lines.append(f"  student {self.final}")
        return "\n".join(lines)


class _StudentForward(nn.Module):
    """Runs a loss function on the student inside one forward call, so DDP/FSDP/DeepSpeed see a normal forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args):
        return fn(self.model, *args)


class Distiller:
    """Distill `teacher` into `student` on instruction records with one technique (docs/design.md §7).

    teacher: an HF causal LM (None for technique="sft"); it runs in inference mode (eval, no grad; bf16 on CUDA
    by default, on `teacher_device` if set). student: any HF causal LM sharing the teacher's tokenizer (e.g. from
    make_student); trained in place. tokenizer: the shared tokenizer; pass `teacher_tokenizer` to have the two
    checked. A teacher_tokenizer that differs from the student's, with loss="uld", distills across tokenizers
    (kdfast.distill.cross). Launch with `accelerate launch` for several processes; `accelerator` may be given.
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module, tokenizer, cfg: DistillConfig | None = None, *,
                 teacher_tokenizer=None, accelerator: Accelerator | None = None):
        self.cfg = cfg = cfg or DistillConfig()
        if cfg.needs_teacher and teacher is None:
            raise DistillError(f"technique {cfg.technique!r} needs a teacher model (only 'sft' trains without one)")
        self.teacher_tokenizer = teacher_tokenizer if cross_tokenizer_mode(teacher_tokenizer, tokenizer, cfg) else None
        self.teacher = teacher if cfg.needs_teacher else None
        if is_quantized(student) and not cfg.student_quantize:
            raise DistillError("the student is quantized (bitsandbytes): its integer weights get no gradient, so it "
                               "cannot be trained. Train LoRA adapters on it (--student-quantize nf4 --lora-rank N; "
                               "in Python student_quantize, lora_rank), or load the student in bf16/fp32 (load_model "
                               "without quantize); to save memory quantize the teacher (--teacher-quantize nf4), or "
                               "use --optim adamw_8bit or --master-weights bf16 (teacher_quantize, optim, "
                               "master_weights)")
        if cfg.resume and not cfg.out:
            raise DistillError("resume=True (--resume) needs out= (--out): the folder holding the checkpoints")
        self.accelerator = accelerator or _accelerator(cfg)
        if cfg.device is not None and self.accelerator.num_processes > 1 and cfg.device != "cpu":
            raise DistillError("device= (--device) cannot be set under a multi-process launch; accelerate assigns the "
                               "devices")
        self.device = torch.device(cfg.device) if cfg.device else self.accelerator.device
        if cfg.student_quantize:
            student = _quantized_student(student, cfg.student_quantize, self.device)
        self.student, self.tokenizer = student, tokenizer
        if cfg.lora_rank and not has_lora(student):
            apply_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if self.teacher_tokenizer is not None:
            check_cross_vocab(self.teacher, student, self.teacher_tokenizer, tokenizer)
        else:
            _check_vocab(self.teacher, student, tokenizer, cfg.vocab)
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.teacher_device = torch.device(cfg.teacher_device) if cfg.teacher_device else self.device
        if self.teacher is not None:
            self.teacher = _prepare_teacher(self.teacher, self.teacher_device, cfg.teacher_dtype, cfg.teacher_quantize)

    def train(self, train_records: list[dict], eval_records: list[dict] | None = None,
              lm_records: list[dict] | None = None, *,
              on_step: Callable[[int, dict], bool | None] | None = None,
              sources: dict[str, str] | None = None) -> DistillSummary:
        """Train on `train_records` (instruction records) and save the student under <out>/final.

        eval_records (optional) give the validation loss, evaluated every eval_every steps (DistiLLM's schedule
        needs them); lm_records ({"text"} records) add the pretraining-text term. on_step(step, metrics) is called
        after every step; returning True stops the run after a checkpoint (resume=True continues it). A finished
        run in `out` is not repeated: resume=True returns its summary. sources ({"train": file name, ...}) name the
        records in the error a resume on other records raises.
        """
        cfg, acc = self.cfg, self.accelerator
        started = time.perf_counter()
        out = Path(cfg.out) if cfg.out else None
        if out is not None and acc.is_main_process:
            remove_stale_temporaries(out)  # a killed run's half-written checkpoints and files
            _check_same_records(out, {"train": train_records, "eval": eval_records, "lm": lm_records},
                                sources or {}, cfg.resume)
        if out is not None and cfg.resume and (out / "summary.json").exists() and (out / "final").exists():
            return DistillSummary(**json.loads((out / "summary.json").read_text()))
        run = self._start(train_records, lm_records, out)
        evals = encode_training(self.tokenizer, eval_records, cfg.max_len, cfg.max_prompt_len, cfg.long_prompts,
                                "eval") if eval_records else None
        if (cfg.technique == "distillm" and not evals and cfg.student_gen_fraction is None
                and cfg.init_threshold == 0):
            warnings.warn("DistiLLM's adaptive schedule needs eval records (--eval-data, eval_records in Python): "
                          "without them its threshold stays at init_threshold=0 and the student never generates",
                          stacklevel=2)
        progress = (self._restore(run, out) if cfg.resume else None) or _Progress()
        if evals and progress.step == 0:
            progress.eval_loss = self._evaluate(run, evals)
            run.technique.on_eval(progress.eval_loss)
            self._log(out, {"step": 0, "eval_loss": progress.eval_loss})
        stopped = self._loop(run, progress, evals, out, on_step, started)
        progress.seconds += time.perf_counter() - started
        final = self._save_final(run, out) if out is not None and not stopped else None
        summary = DistillSummary(cfg.technique, progress.step, run.total_steps, progress.tokens,
                                 _recent(progress.history), progress.eval_loss, progress.seconds,
                                 None if final is None else str(final), stopped)
        if final is not None and acc.is_main_process:
            atomic_write_json(out / "summary.json", asdict(summary))
        return summary

    def _loop(self, run: RunContext, progress: "_Progress", evals, out: Path | None, on_step, started: float) -> bool:
        """Optimizer steps until the end (False) or until on_step asks to stop (True)."""
        cfg = self.cfg
        eval_every = cfg.eval_every or max(1, round(run.steps_per_epoch))
        bar = tqdm(total=run.total_steps, initial=progress.step, desc=f"distill {cfg.technique}", dynamic_ncols=True,
                   disable=not (cfg.progress and self.accelerator.is_main_process))
        try:
            while progress.step < run.total_steps:
                metrics = self._step(run, progress.step)
                progress.step += 1
                progress.tokens += int(metrics["tokens"])
                progress.history.append(metrics["loss"])
                if evals and (progress.step % eval_every == 0 or progress.step == run.total_steps):
                    progress.eval_loss = metrics["eval_loss"] = self._evaluate(run, evals)
                    run.technique.on_eval(progress.eval_loss)
                self._log(out, {"step": progress.step, **metrics})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                stop = bool(on_step(progress.step, metrics)) if on_step else False
                due = cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < run.total_steps
                if out is not None and (stop or due):
                    elapsed = progress.seconds + time.perf_counter() - started
                    self._save(run, out, dataclasses.replace(progress, seconds=elapsed))
                if stop:
                    return True
        finally:
            bar.close()
        return False

    # set-up
    def _start(self, train_records, lm_records, out: Path | None) -> RunContext:
        cfg, acc = self.cfg, self.accelerator
        if out is not None and not cfg.resume and (latest_checkpoint(out) is not None or (out / "final").exists()):
            raise DistillError(f"{out} already holds a run; pass --resume (resume=True in Python) to continue it or "
                               "choose another folder (--out)")
        set_seed(cfg.seed)
        train = encode_training(self.tokenizer, train_records, cfg.max_len, cfg.max_prompt_len, cfg.long_prompts)
        lm = encode_texts(self.tokenizer, lm_records, cfg.max_len) if lm_records else None
        if cfg.disable_dropout:
            _disable_dropout(self.student)
        if not is_quantized(self.student):  # a bitsandbytes model is placed when it is quantized, never moved
            self.student.to(self.device)
        self.student.train()
        if cfg.master_weights == "bf16":
            self.student.to(torch.bfloat16)
        if cfg.gradient_checkpointing:  # HF models skip it in eval mode: generation runs without it
            enable_checkpointing(self.student)
        run = RunContext(cfg, self.student, self.teacher, self.tokenizer, acc, self.device, self.teacher_device,
                         self.amp_dtype, train, lm, out)
        if self.teacher_tokenizer is not None:
            run.cross = CrossTokenizer(run, self.teacher_tokenizer)
        run.technique = CLASSES[cfg.technique](run)
        run.technique.prepare()
        per_epoch = len(run.train) // (cfg.batch_size * run.world)
        if per_epoch == 0:
            raise DistillError(f"{len(run.train)} training records cannot fill one batch of {cfg.batch_size} per "
                               f"process × {run.world} processes; lower batch_size or give more records")
        run.steps_per_epoch = per_epoch * run.technique.passes / cfg.grad_accum
        run.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * run.steps_per_epoch))
        optimizer = build_optimizer(cfg.optim, param_groups(self.student, cfg.weight_decay), lr=cfg.lr,
                                    betas=cfg.adam_betas, eps=cfg.adam_eps, device=self.device)
        name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
        run.scheduler = _scheduler(name, optimizer, cfg.warmup_steps, run.total_steps)
        run.wrapped, run.optimizer = acc.prepare(_StudentForward(self.student), optimizer)
        run.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        return run

    # one optimizer step
    def _step(self, run: RunContext, step: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        batches = [run.technique.micro_batch(step, m) for m in range(cfg.grad_accum)]
        counts = {"tokens": 0, "lm_tokens": 0, "generated": 0}
        for mb in batches:
            for key, value in mb.counts().items():
                counts[key] += value
            counts["generated"] += int(mb.generated)
        totals = run.all_sum(counts)
        # Each process's loss is its sum over tokens / (global tokens / scale): the gradient averaging of DDP, FSDP
        # and DeepSpeed (over processes, and DeepSpeed's own division by its accumulation steps) restores the
        # mean over the global batch's tokens.
        scale = run.world * (cfg.grad_accum if acc.distributed_type.name == "DEEPSPEED" else 1)
        norm = {k: v / scale for k, v in totals.items()}
        run.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for i, mb in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(run.wrapped)
            with sync:
                with run.autocast():
                    loss, stats = run.wrapped(run.technique.loss, mb, norm)
                acc.backward(run.scaler.scale(loss) if run.scaler else loss)
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        if run.scaler:
            run.scaler.unscale_(run.optimizer)
        grad_norm = acc.clip_grad_norm_(run.wrapped.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        lr = run.scheduler.get_last_lr()[0]
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.scheduler.step()
        metrics = {k: v / scale for k, v in run.all_sum(sums).items()}
        metrics.update(tokens=totals["tokens"], lr=lr, epoch=round(run.stream.epochs_done, 4),
                       generated=totals["generated"] / (cfg.grad_accum * run.world))
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(run.technique.status())
        return metrics

    @torch.no_grad()
    def _evaluate(self, run: RunContext, items: list[Encoded]) -> float:
        """Mean student cross-entropy over the response tokens of `items` (sharded over the processes)."""
        cfg = self.cfg
        mine = items[run.rank:: run.world]

        def nll(model, chunk):
            batch = run.collate(chunk)
            return token_nll(forward_rows(model, batch, cfg.fused), batch["targets"][valid(batch)]).sum()

        total = 0.0
        with eval_mode(self.student):
            for start in range(0, len(mine), cfg.batch_size):
                with run.autocast():
                    total += float(run.wrapped(nll, mine[start: start + cfg.batch_size]))
        sums = run.all_sum({"nll": total, "tokens": count_targets(mine)})
        return sums["nll"] / max(sums["tokens"], 1.0)

    # files
    def _log(self, out: Path | None, record: dict) -> None:
        if out is None or not self.accelerator.is_main_process:
            return
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, run: RunContext, out: Path, progress: "_Progress") -> None:
        cfg = self.cfg
        shared = {"progress": asdict(progress), "scheduler": run.scheduler.state_dict(),
                  "stream": run.stream.state_dict(),
                  "lm_stream": run.lm_stream.state_dict() if run.lm_stream else None,
                  "scaler": run.scaler.state_dict() if run.scaler else None, "config": cfg.to_dict()}
        save_checkpoint(checkpoint_path(out, progress.step), self.accelerator, self.student, run.optimizer, shared,
                        {"technique": run.technique.state_dict()}, run.technique.state_tensors(), cfg.keep_checkpoints)

    def _restore(self, run: RunContext, out: Path) -> "_Progress | None":
        """Load the latest checkpoint into the run; None when there is none (a fresh start)."""
        path = latest_checkpoint(out)
        if path is None:
            return None
        shared, rank_state, tensors = load_checkpoint(path, self.accelerator, self.student, run.optimizer)
        _check_same_run(shared["config"], self.cfg.to_dict(), path)
        run.scheduler.load_state_dict(shared["scheduler"])
        run.stream.load_state_dict(shared["stream"])
        if run.lm_stream is not None and shared["lm_stream"]:
            run.lm_stream.load_state_dict(shared["lm_stream"])
        if run.scaler is not None and shared["scaler"]:
            run.scaler.load_state_dict(shared["scaler"])
        run.technique.load_state_dict(rank_state["technique"])
        run.technique.load_state_tensors(tensors)
        progress = _Progress(**shared["progress"])
        if self.accelerator.is_main_process and (out / "metrics.jsonl").exists():
            kept = [line for line in (out / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["step"] <= progress.step]
            atomic_write_text(out / "metrics.jsonl", "".join(line + "\n" for line in kept))
        return progress

    def _save_final(self, run: RunContext, out: Path) -> Path:
        """The student with its tokenizer in HF format (safetensors) under <out>/final, written atomically."""
        acc, final = self.accelerator, out / "final"
        state = acc.get_state_dict(run.wrapped)
        if acc.is_main_process:
            state = {k.removeprefix("model."): v for k, v in state.items()}
            lora = has_lora(self.student)
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            with atomic_path(final) as tmp:
                if lora:  # peft's adapter format for peft users, beside the merged model everything else loads
                    save_adapter(self.student, state, tmp / "adapter")
                    self.tokenizer.save_pretrained(tmp / "adapter")
                    state = merged_state_dict(self.student, state)  # a plain model of the student's architecture
                # a quantized student's merged state is dequantized: it is saved as the plain model it now is
                owner = plain_skeleton(self.student) if is_quantized(self.student) else self.student
                owner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                atomic_write_json(tmp / "distill_config.json", self.cfg.to_dict())
            if bars:
                hf_logging.enable_progress_bar()
        acc.wait_for_everyone()
        return final


def _accelerator(cfg: DistillConfig) -> Accelerator:
    # accelerate divides every loss by its gradient_accumulation_steps; the loop normalizes by global token counts
    # itself, so that stays 1 except under DeepSpeed, whose engine must know when to step.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Without cpu=True accelerate does not set up gloo for a multi-process launch on a machine without GPUs.
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, device_placement=cfg.device is None,
                       gradient_accumulation_steps=cfg.grad_accum if deepspeed else 1)


def _recent(history: list[float], n: int = 10) -> float:
    tail = history[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


def _head_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _check_vocab(teacher, student, tokenizer, policy: str) -> None:
    vs = _head_rows(student)
    vt = _head_rows(teacher) if teacher is not None else vs
    if vs != vt and policy == "error":
        raise DistillError(f"the teacher's output head has {vt} rows and the student's {vs}: their vocabularies "
                           "differ. If the extra rows are padding, distill over the common prefix with "
                           "--vocab intersect (vocab='intersect'); otherwise pick a student with the teacher's "
                           "vocabulary")
    if len(tokenizer) > min(vs, vt):
        smaller = "student" if vs <= vt else "teacher"
        raise DistillError(f"the tokenizer has {len(tokenizer)} tokens but the {smaller}'s "
                           f"output head only {min(vs, vt)} rows; use the models' own tokenizer")


def _amp_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype | None:
    if cfg.fp16:
        return torch.float16
    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    elif bf16:
        warn_if_bf16_emulated(device, "DistillConfig.bf16")
    return torch.bfloat16 if bf16 else None


def _prepare_teacher(teacher: nn.Module, device: torch.device, dtype: str | None, quantize: str | None) -> nn.Module:
    """Inference mode: eval, no grad, the chosen dtype (auto: bf16 on CUDA), on `device`; quantized if asked.

    A quantized teacher (given so, or quantized here) is never moved or cast: bitsandbytes layers do not survive it.
    """
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else None
    torch_dtype = getattr(torch, dtype) if dtype is not None else None
    if quantize is not None and not is_quantized(teacher):
        teacher = quantize_model(teacher, quantize, dtype=torch_dtype, device=device)
    teacher.eval()
    teacher.requires_grad_(False)
    if is_quantized(teacher):
        return teacher
    if torch_dtype is not None:
        teacher.to(torch_dtype)
    if getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device)
    return teacher


def _quantized_student(student: nn.Module, quantize: str, device: torch.device) -> nn.Module:
    """The QLoRA base: a bitsandbytes copy of an unquantized student on `device` (its unquantized parameters keep
    their dtype), or a student given quantized, checked to be on `device` (it cannot be moved)."""
    if not is_quantized(student):
        return quantize_model(student, quantize, dtype=next(student.parameters()).dtype, device=device)
    where = model_device(student)
    if where.type != device.type or (device.index is not None and where.index != device.index):
        raise DistillError(f"the quantized student is on {where} but trains on {device}, and a bitsandbytes model "
                           "cannot be moved: load it with load_model(..., quantize=..., device=...) on the training "
                           "device, or give it unquantized (the Distiller quantizes it there)")
    return student


def _disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: nn.Dropout modules and the float rates models apply functionally (OPT's `dropout`)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop"):
                setattr(module, name, 0.0)


def _check_same_run(saved: dict, now: dict, path: Path) -> None:
    changed = {k: (saved.get(k), v) for k, v in now.items() if k not in _RESUMABLE and _norm(saved.get(k)) != _norm(v)}
    if changed:
        text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise DistillError(f"cannot resume {path} with a different configuration ({text}); use the saved settings "
                           "or start a new run in another folder")


def _check_same_records(out: Path, records: dict[str, list | None], sources: dict[str, str], resume: bool) -> None:
    """A resumed run trains on the records it started with: their hashes are saved in out/records.json."""
    now = {k: {"hash": digest(v),
               "source": sources.get(k, f"the {k} records given")} for k, v in records.items() if v}
    path = out / "records.json"
    if resume and path.exists():
        saved = json.loads(path.read_text())
        for key in saved.keys() | now.keys():
            a, b = saved.get(key), now.get(key)
            if (a or {}).get("hash") != (b or {}).get("hash"):
                was = f"{a['source']} (records {a['hash']})" if a else "none"
                given = f"{b['source']} (records {b['hash']})" if b else "none"
                raise DistillError(f"cannot resume {out}: it trained on {key} data {was}, now given {given}; resume "
                                   "with the same records, or start a new run in another --out")
        return
    if resume or not (latest_checkpoint(out) is not None or (out / "final").exists()):  # else _start refuses
        atomic_write_json(path, now)


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def _scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    # transformers' scheduler module imports peft, and peft imports bitsandbytes, whose import may ask the Hub
    import_bitsandbytes()
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
