"""Input validation shared by the ops: every bad input gets a ValueError that names it and the fix."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

VOCAB_POLICIES = ("error", "intersect")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def common_vocab(student_vocab: int, teacher_vocab: int, vocab: str) -> int:
    """The vocabulary width both models are compared over, per the `vocab` policy."""
    check_choice("vocab policy", vocab, VOCAB_POLICIES)
    if student_vocab != teacher_vocab and vocab == "error":
        raise ValueError(f"student vocab size {student_vocab} != teacher vocab size {teacher_vocab}; pass "
                         f"vocab='intersect' to compare the first {min(student_vocab, teacher_vocab)} entries")
    return min(student_vocab, teacher_vocab)


def check_float(name: str, tensor: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if tensor.dtype not in allowed:
        raise ValueError(f"{name} has dtype {tensor.dtype}; supported: {', '.join(map(str, allowed))}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(present.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k} on {d}" for k, d in present.items()))


def check_labels(labels: torch.Tensor | None, lead_shape: torch.Size, what: str = "logits") -> None:
    if labels is None:
        return
    if labels.shape != lead_shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the {what} need {tuple(lead_shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def check_label_values(labels: torch.Tensor | None, vocab: int, ignore_index: int) -> None:
    """Every label is a token id in [0, vocab) or ignore_index: the one check (and message) of distill_loss, the
    fused losses and token_stats. A stray value (-1 for a mask, an id past the head) would otherwise count as a
    valid position in one op and fail in another. One host sync; call it inside the custom ops (torch.compile)."""
    if labels is None:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"label {int(labels[where])} at position {where} is neither a token id in [0, {vocab}) "
                         f"(the vocabulary used) nor ignore_index={ignore_index}; mask positions with {ignore_index} "
                         "or pass the ignore_index your labels use")


def raise_if_nonfinite(bad: torch.Tensor, student_bit: int, teacher_bit: int) -> None:
    """bad [N] int flags from a divergence pass; one host sync. Names the first bad row and which model."""
    bad_rows = torch.nonzero(bad).flatten()
    if bad_rows.numel() == 0:
        return
    row = int(bad_rows[0])
    flags = int(bad[row])
    who = " and ".join(n for n, bit in (("student", student_bit), ("teacher", teacher_bit)) if flags & bit)
    raise ValueError(f"non-finite logits (NaN or +inf) in the {who} at row {row} of the flattened [N, V] input "
                     f"({bad_rows.numel()} bad rows in all); −inf is allowed, NaN and +inf are not")
