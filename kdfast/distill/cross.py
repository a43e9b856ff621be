"""Cross-tokenizer distillation in the trainer (loss="uld"): each student sequence's text re-tokenized for the
teacher, the aligned rows (kdfast.distill.align) and the objective soft_weight·ULD + hard_weight·CE on the student's
own tokens."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.data import Encoded
from kdfast.distill.align import align, encode_text, prompt_ids, split_text
from kdfast.distill.config import CROSS_KINDS, DistillConfig, DistillError
from kdfast.distill.data import collate, count_targets
from kdfast.distill.objective import Rows, forward_rows, token_nll, valid
from kdfast.generation import pad_token_id
from kdfast.models import ModelError, check_same_tokenizer
from kdfast.ops.uld import uld_loss


def cross_tokenizer_mode(teacher_tokenizer, tokenizer, cfg: DistillConfig) -> bool:
    """True when the teacher's tokenizer differs from the student's and the loss is uld; clear errors otherwise."""
    differ = False
    if teacher_tokenizer is not None:
        try:
            check_same_tokenizer(teacher_tokenizer, tokenizer)
        except ModelError as e:
            differ = True
            reason = str(e)
    if differ and cfg.loss not in CROSS_KINDS and cfg.needs_teacher:
        raise ModelError(f"{reason}; or, to distill across tokenizers, use loss='uld' (CLI: --loss uld), which "
                         "compares sorted probabilities at aligned positions (alignment='spans' or 'positions')")
    if cfg.loss in CROSS_KINDS and cfg.needs_teacher and not differ:
        raise DistillError("loss='uld' is for a teacher whose tokenizer differs from the student's: pass "
                           "teacher_tokenizer= (CLI: --teacher-tokenizer, or a --teacher with its own tokenizer); "
                           "with one shared tokenizer use a same-vocabulary loss such as fkl")
    return differ and cfg.needs_teacher


def check_cross_vocab(teacher: nn.Module, student: nn.Module, teacher_tokenizer, tokenizer) -> None:
    """Each model's output head must cover its own tokenizer."""
    for who, model, tok in (("teacher", teacher, teacher_tokenizer), ("student", student, tokenizer)):
        head = model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else model.config.vocab_size
        if len(tok) > rows:
            raise DistillError(f"the {who} tokenizer has {len(tok)} tokens but the {who}'s output head only {rows} "
                               f"rows; give the {who} its own tokenizer")


@dataclass
class CrossBatch:
    """The teacher's sequences for one micro-batch and the aligned rows (indices into each side's valid-target
    rows, row-major over the batch): pairs [P], and the merged tokens (row [M] and the pair it scales [M])."""

    teacher: list[Encoded]
    student_rows: torch.Tensor
    teacher_rows: torch.Tensor
    student_merge: tuple[torch.Tensor, torch.Tensor]
    teacher_merge: tuple[torch.Tensor, torch.Tensor]


class CrossTokenizer:
    """The cross-tokenizer side of a run: re-tokenizes micro-batches and computes their objective."""

    def __init__(self, ctx, teacher_tokenizer):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.student_tok, self.teacher_tok = ctx.tokenizer, teacher_tokenizer
        tok = teacher_tokenizer
        self.teacher_eos = tok.eos_token_id
        self.teacher_pad = pad_token_id(tok)
        if self.teacher_pad is None:
            raise DistillError("the teacher tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")

    def pair(self, seqs: list[Encoded]) -> tuple[list[Encoded], CrossBatch]:
        """Student sequences -> (the student's canonical tokenization of their text, the CrossBatch).

        A sequence's text is decoded from the student's tokens and tokenized again by both tokenizers (a sampled
        sequence need not be the tokenizer's own tokenization of its text), each cut to max_len.
        """
        cfg = self.cfg
        students, teachers = [], []
        pairs: list[list[int]] = [[], []]
        merges: list[list[int]] = [[], [], [], []]
        offsets = [0, 0]
        for example in seqs:
            prompt, text, eos = split_text(self.student_tok, example)
            sides = [encode_text(tok, prompt, text, eos, cfg.max_len) for tok in (self.student_tok, self.teacher_tok)]
            found = align(cfg.alignment, sides[0].ends, sides[1].ends)
            # A response token is predicted by the row before it; with an empty prompt the first one has none.
            skip = [1 if side.encoded.prompt_len == 0 else 0 for side in sides]
            for s, t, s_more, t_more in zip(found.student, found.teacher, found.student_merged, found.teacher_merged):
                if s < skip[0] or t < skip[1]:
                    continue
                p = len(pairs[0])
                pairs[0].append(offsets[0] + s - skip[0])
                pairs[1].append(offsets[1] + t - skip[1])
                for side, more in ((0, s_more), (1, t_more)):
                    merges[2 * side] += [offsets[side] + m - skip[side] for m in more]
                    merges[2 * side + 1] += [p] * len(more)
            for side in (0, 1):
                offsets[side] += count_targets([sides[side].encoded])
            students.append(sides[0].encoded)
            teachers.append(sides[1].encoded)
        long = [torch.tensor(xs, dtype=torch.long) for xs in pairs + merges]
        return students, CrossBatch(teachers, long[0], long[1], (long[2], long[3]), (long[4], long[5]))

    def loss_sum(self, model: nn.Module, seqs: list[Encoded], cross: CrossBatch, *, soft_weight: float,
                 hard_weight: float) -> torch.Tensor:
        """soft_weight·Σ_pairs ULD(teacher ‖ student) + hard_weight·Σ_tokens CE(student's own targets) over one
        micro-batch."""
        ctx, cfg = self.ctx, self.cfg
        batch = ctx.collate(seqs)
        targets = batch["targets"][valid(batch)]
        student = forward_rows(model, batch, cfg.fused)
        merged = cross.student_merge[0].numel() > 0
        nll = token_nll(student, targets) if hard_weight or merged else None
        total = hard_weight * nll.sum() if hard_weight else student.values.sum() * 0.0
        if not soft_weight or cross.student_rows.numel() == 0:
            return total
        device = student.values.device
        tbatch = collate(cross.teacher, self.teacher_pad, ctx.device)
        teacher = ctx.teacher_rows(tbatch)
        with torch.no_grad():
            t_logits = _logits_at(teacher, cross.teacher_rows.to(device))
            t_scale = _merged_log_prob(teacher, tbatch["targets"][valid(tbatch)], cross.teacher_merge, len(t_logits))
        s_scale = None
        if merged:
            tokens, pair = (x.to(device) for x in cross.student_merge)
            s_scale = torch.zeros(len(t_logits), dtype=nll.dtype, device=device).index_add(0, pair, -nll[tokens])
        s_logits = _logits_at(student, cross.student_rows.to(device))
        return total + soft_weight * uld_loss(s_logits, t_logits, top_k=cfg.uld_top_k, temperature=cfg.temperature,
                                              reduction="sum", student_log_scale=s_scale, teacher_log_scale=t_scale)

    def teacher_prompt(self, student_prompt: list[int]) -> list[int]:
        """The teacher's tokens of the text of a student prompt."""
        text = self.student_tok.decode(student_prompt, skip_special_tokens=True)
        return prompt_ids(self.teacher_tok, text)

    def student_response(self, teacher_response: list[int]) -> list[int]:
        """The student's tokens of the text of a teacher response (EOS kept as the student's EOS)."""
        eos = bool(teacher_response) and teacher_response[-1] == self.teacher_eos
        text = self.teacher_tok.decode(teacher_response[:-1] if eos else teacher_response, skip_special_tokens=True)
        ids = self.student_tok(text, add_special_tokens=False)["input_ids"]
        return ids + ([self.student_tok.eos_token_id] if eos and self.student_tok.eos_token_id is not None else [])


def _logits_at(rows: Rows, index: torch.Tensor) -> torch.Tensor:
    """Logits [P, V] of the selected rows (from hidden states and the head when the rows hold hidden states)."""
    values = rows.values[index]
    if rows.head is None:
        return values
    weight, bias = rows.head
    return F.linear(values, weight.to(values.dtype), None if bias is None else bias.to(values.dtype))


def _merged_log_prob(rows: Rows, targets: torch.Tensor, merge: tuple[torch.Tensor, torch.Tensor],
                     n: int) -> torch.Tensor | None:
    """Per pair, Σ log p(token) over the merged tokens [n] (None when nothing is merged)."""
    index, pair = (x.to(rows.values.device) for x in merge)
    if index.numel() == 0:
        return None
    logp = -token_nll(dataclasses.replace(rows, values=rows.values[index]), targets[index])
    return torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, pair, logp)


def across_tokenizers(cfg: DistillConfig, teacher_tokenizer, tokenizer, where: str) -> DistillConfig:
    """cfg for a student given with its own tokenizer (the audit's students.sizes.<name>: <model>): unchanged when
    the tokenizers agree, else loss='uld' with lm_kd_ratio=0; minillm cannot run across tokenizers."""
    if not cfg.needs_teacher:
        return cfg
    try:
        check_same_tokenizer(teacher_tokenizer, tokenizer)
        return cfg
    except ModelError:
        pass
    if cfg.technique == "minillm":
        raise DistillError(f"{where} has its own tokenizer and minillm needs the teacher's (one vocabulary): remove "
                           "minillm from students.techniques, or give this size as teacher layers")
    return cfg if cfg.loss in CROSS_KINDS else dataclasses.replace(cfg, loss="uld", lm_kd_ratio=0.0)
