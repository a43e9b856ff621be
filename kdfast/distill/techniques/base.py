"""The interface every technique implements, and the shared divergence technique (SFT, KD, SeqKD, ImitKD, GKD)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kdfast.data import Encoded
from kdfast.distill.buffer import ReplayBuffer
from kdfast.distill.context import RunContext
from kdfast.distill.data import count_targets
from kdfast.distill.objective import divergence_sum, forward_rows, valid


@dataclass
class MicroBatch:
    """The sequences of one micro-batch (+ pretraining text), whether the student generated them, and per-target
    arrays some techniques attach (MiniLLM: old log-probs, importance weights, advantages)."""

    seqs: list[Encoded]
    lm: list[Encoded] | None = None
    generated: bool = False
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    cross: object | None = None  # the teacher's side across tokenizers (kdfast.distill.cross.CrossBatch)

    def counts(self) -> dict[str, int]:
        return {"tokens": count_targets(self.seqs), "lm_tokens": count_targets(self.lm) if self.lm else 0}


class Technique:
    """One distillation technique on the shared loop.

    The loop asks for `grad_accum` micro-batches per optimizer step (micro_batch), sums their token counts over
    the processes into `totals`, and back-propagates loss(model, mb, totals), which runs inside the student's
    (DDP/FSDP-wrapped) forward and must be normalized by those global totals.
    """

    name = "base"
    needs_teacher = True

    def __init__(self, ctx: RunContext):
        self.ctx, self.cfg = ctx, ctx.cfg

    @property
    def passes(self) -> int:
        """Training passes per example drawn (MiniLLM's PPO epochs); sets the steps of an epoch."""
        return 1

    def prepare(self) -> None:
        """One-time work before the first step (SeqKD: the teacher's responses)."""

    def micro_batch(self, step: int, micro: int) -> MicroBatch:
        raise NotImplementedError

    def loss(self, model: nn.Module, mb: MicroBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def on_eval(self, eval_loss: float) -> None:
        """Called with the validation loss after each evaluation (DistiLLM adapts its schedule)."""

    def status(self) -> dict[str, float]:
        """Values logged as they are after each step (schedule state, buffer fill)."""
        return {}

    def state_dict(self) -> dict:
        """JSON-able state of this process, saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor state of this process (replay buffer, rollouts), saved as safetensors."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def add_lm_loss(self, model: nn.Module, items: list[Encoded] | None, totals: dict[str, float],
                    loss: torch.Tensor, stats: dict) -> tuple[torch.Tensor, dict]:
        """`loss` plus the pretraining-text term when the micro-batch has text (its value logged as stats["lm"])."""
        lm = self.lm_loss(model, items, totals)
        if lm is None:
            return loss, stats
        return loss + lm, {**stats, "lm": lm.detach()}

    def lm_loss(self, model: nn.Module, items: list[Encoded] | None, totals: dict[str, float]) -> torch.Tensor | None:
        """lm_coef · [r·KD + (1 − r)·CE] on pretraining text, normalized by the global text tokens (r = lm_kd_ratio)."""
        if not items:
            return None
        cfg = self.cfg
        batch = self.ctx.collate(items)
        student = forward_rows(model, batch, cfg.fused)
        teacher = self.ctx.teacher_rows(batch) if cfg.lm_kd_ratio > 0 else None
        total = divergence_sum(student, teacher, batch["targets"][valid(batch)], kind="fkl",
                               soft_weight=cfg.lm_kd_ratio, hard_weight=1.0 - cfg.lm_kd_ratio, beta=cfg.beta,
                               alpha=cfg.skew_alpha, temperature=cfg.temperature, vocab=cfg.vocab,
                               chunk_size=cfg.chunk_size)
        return cfg.lm_coef * total / max(totals["lm_tokens"], 1.0)


class DivergenceTechnique(Technique):
    """r·divergence(teacher ‖ student) + (1 − r)·CE on the micro-batch's responses (r = kd_ratio, kind = loss).

    Data policy: with probability student_gen_fraction the micro-batch's responses are sampled from the student
    (pushed to the replay buffer and a batch drawn from it, when buffer_size > 0); else the records' responses.
    """

    name = "divergence"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.buffer = ReplayBuffer(self.cfg.buffer_size) if self.cfg.buffer_size > 0 else None
        self.cache = None

    def prepare(self) -> None:
        if self.cfg.teacher_cache:
            from kdfast.distill.teacher_cache import open_for_training

            self.cache = open_for_training(self.ctx)

    def micro_batch(self, step: int, micro: int) -> MicroBatch:
        examples = self.ctx.take(self.cfg.batch_size)
        seqs, generated = self.choose(examples, step, micro)
        cross = None
        if self.ctx.cross is not None:
            seqs, cross = self.ctx.cross.pair(seqs)
        return MicroBatch(seqs, self.ctx.take_lm(self.cfg.batch_size), generated, cross=cross)

    def choose(self, examples: list[Encoded], step: int, micro: int) -> tuple[list[Encoded], bool]:
        fraction = self.cfg.student_gen_fraction
        rng = self.ctx.rng("data", step, micro)
        if not fraction or rng.random() >= fraction:
            return examples, False
        fresh = self.ctx.generate_student(examples, self.ctx.seed("gen", step, micro))
        if self.buffer is None:
            return fresh, True
        self.buffer.push(fresh)
        return self.buffer.sample(len(examples), rng), True

    def loss(self, model: nn.Module, mb: MicroBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        if mb.cross is not None:
            total = self.ctx.cross.loss_sum(model, mb.seqs, mb.cross, soft_weight=cfg.kd_ratio,
                                            hard_weight=1.0 - cfg.kd_ratio)
        else:
            batch = self.ctx.collate(mb.seqs)
            student = forward_rows(model, batch, cfg.fused)
            targets = batch["targets"][valid(batch)]
            if self.cache is not None and cfg.kd_ratio > 0:
                from kdfast.distill.teacher_cache import cached_divergence_sum

                total = cached_divergence_sum(self.cache, mb.seqs, student, targets, kind=cfg.loss,
                                              tail=cfg.teacher_cache_tail, soft_weight=cfg.kd_ratio,
                                              hard_weight=1.0 - cfg.kd_ratio, beta=cfg.beta, alpha=cfg.skew_alpha,
                                              temperature=cfg.temperature, chunk_size=cfg.chunk_size)
            else:
                teacher = self.ctx.teacher_rows(batch) if cfg.kd_ratio > 0 else None
                total = divergence_sum(student, teacher, targets, kind=cfg.loss, soft_weight=cfg.kd_ratio,
                                       hard_weight=1.0 - cfg.kd_ratio, beta=cfg.beta, alpha=cfg.skew_alpha,
                                       temperature=cfg.temperature, vocab=cfg.vocab, chunk_size=cfg.chunk_size)
        loss = total / max(totals["tokens"], 1.0)
        return self.add_lm_loss(model, mb.lm, totals, loss, {"objective": loss.detach()})

    def status(self) -> dict[str, float]:
        return {"buffer": len(self.buffer)} if self.buffer is not None else {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.buffer.state_tensors() if self.buffer is not None else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.buffer is not None:
            self.buffer.load_state_tensors(tensors)
