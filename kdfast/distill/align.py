"""Aligning the response tokens of two tokenizations of one text (cross-tokenizer distillation): which student and
teacher positions are compared, and which further tokens a compared distribution is merged with."""
from __future__ import annotations

from dataclasses import dataclass, field

from kdfast.data import IGNORE_INDEX, Encoded

ALIGNMENTS = ("spans", "positions")


@dataclass
class Alignment:
    """Compared pairs of response-token indices (0 = the first response token) of one sequence.

    student[i] and teacher[i] are the tokens whose predicting distributions are compared. student_merged[i] /
    teacher_merged[i] list the later tokens of the same aligned group: the compared distribution is multiplied by
    their probabilities (the chain rule: the group's first-token distribution times the probability of the rest of
    the group's text), so both sides speak of the same span of characters.
    """

    student: list[int] = field(default_factory=list)
    teacher: list[int] = field(default_factory=list)
    student_merged: list[list[int]] = field(default_factory=list)
    teacher_merged: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.student)


def align_positions(n_student: int, n_teacher: int) -> Alignment:
    """ULD's own alignment: the i-th response token of each side, for i below the shorter response's length."""
    n = min(n_student, n_teacher)
    return Alignment(list(range(n)), list(range(n)), [[] for _ in range(n)], [[] for _ in range(n)])


def boundaries(ends: list[int]) -> dict[int, int]:
    """{character offset: index of the token ending there} for the offsets where a token boundary lies.

    A token whose end equals the next token's end (byte-level pieces of one multi-byte character share their
    character span) is not a boundary: the text cannot be cut between them.
    """
    out = {}
    for i, end in enumerate(ends):
        if i + 1 == len(ends) or ends[i + 1] > end:
            out[end] = i
    return out


def align_spans(student_ends: list[int], teacher_ends: list[int]) -> Alignment:
    """GOLD-style alignment from the character offsets where each response token ends.

    The offsets where both tokenizations have a token boundary cut the response into groups of the same
    characters. Each group is compared once: at its first token on each side (both models then condition on the
    same text), merged with the group's later tokens (Alignment). Tokens after the last shared boundary
    (one side truncated) are not compared.
    """
    bs, bt = boundaries(student_ends), boundaries(teacher_ends)
    out = Alignment()
    first_s = first_t = 0
    for cut in sorted(bs.keys() & bt.keys()):
        last_s, last_t = bs[cut], bt[cut]
        if last_s < first_s or last_t < first_t:  # an empty group (a zero-width token): nothing to compare
            continue
        out.student.append(first_s)
        out.teacher.append(first_t)
        out.student_merged.append(list(range(first_s + 1, last_s + 1)))
        out.teacher_merged.append(list(range(first_t + 1, last_t + 1)))
        first_s, first_t = last_s + 1, last_t + 1
    return out


def align(mode: str, student_ends: list[int], teacher_ends: list[int]) -> Alignment:
    """align_spans or align_positions (which only uses the token counts)."""
    if mode == "positions":
        return align_positions(len(student_ends), len(teacher_ends))
    if mode == "spans":
        return align_spans(student_ends, teacher_ends)
    raise ValueError(f"unknown alignment {mode!r}; choose one of {ALIGNMENTS}")


@dataclass
class Tokenized:
    """One side of a cross-tokenizer pair: the encoded sequence and the character end of each response token."""

    encoded: Encoded
    ends: list[int]


def encode_text(tokenizer, prompt: str, response: str, eos: bool, max_len: int) -> Tokenized:
    """prompt (with the tokenizer's special tokens, as kdfast.data.encode) + response (+ EOS), cut to max_len.

    ends[i] is the character offset in `response` where response token i ends (from the offset mapping); the EOS
    token ends one past the text, so both sides' EOS tokens form a shared boundary of their own.
    """
    prompt = prompt_ids(tokenizer, prompt)
    try:
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise ValueError(f"{type(tokenizer).__name__} gives no offset mapping; cross-tokenizer distillation needs "
                         "fast tokenizers (PreTrainedTokenizerFast) on both sides") from e
    ids, ends = list(enc["input_ids"]), [end for _, end in enc["offset_mapping"]]
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        ends.append(len(response) + 1)
    room = max(0, max_len - len(prompt))
    ids, ends = ids[:room], ends[:room]
    labels = [IGNORE_INDEX] * len(prompt) + ids
    if labels:
        labels[0] = IGNORE_INDEX  # as kdfast.data.encode: the first token has no context to be predicted from
    return Tokenized(Encoded(prompt + ids, labels, len(prompt)), ends)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's tokens with the tokenizer's special tokens, as kdfast.data.encode makes them."""
    if prompt:
        return list(tokenizer(prompt)["input_ids"])
    add_bos = getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
    return [tokenizer.bos_token_id] if add_bos else []


def split_text(tokenizer, example: Encoded) -> tuple[str, str, bool]:
    """(prompt text, response text, ends with EOS) of an encoded sequence; special tokens are dropped."""
    ids = example.input_ids
    response = ids[example.prompt_len:]
    eos = bool(response) and response[-1] == tokenizer.eos_token_id
    if eos:
        response = response[:-1]
    prompt = tokenizer.decode(ids[: example.prompt_len], skip_special_tokens=True)
    return prompt, tokenizer.decode(response, skip_special_tokens=True), eos
