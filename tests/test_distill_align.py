"""Cross-tokenizer alignment on hand-made tokenizer pairs whose right answer is known: character- vs word-level,
two subword splits that share only some boundaries, byte-level pieces of one character, truncation, EOS."""
from types import SimpleNamespace

import pytest
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tk_models
from transformers import PreTrainedTokenizerFast

from kdfast import models
from kdfast.data import IGNORE_INDEX, Encoded
from kdfast.distill import DistillConfig
from kdfast.distill.align import (
    align,
    align_positions,
    align_spans,
    boundaries,
    encode_text,
)
from kdfast.distill.cross import CrossTokenizer


def hand_made(pieces: list[str], split: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `pieces`, pre-split by the regex `split` (None: whitespace and punctuation)."""
    vocab = {p: i for i, p in enumerate(["<eos>", "<unk>", *pieces])}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if split is None else pre_tokenizers.Split(Regex(split),
                                                                                               "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


CHARS = hand_made(list("abcdefghijklmnopqrstuvwxyz .:#\n"), ".|\n")
WORDS = hand_made(["the", "cat", "sat", "."], None)


def ends(tokenizer, text: str) -> list[int]:
    return encode_text(tokenizer, "", text, False, 10_000).ends


def test_characters_against_words():
    """'the cat sat.': the word tokens end at 3, 7, 11, 12, where character tokens also end; the spaces (at 3-4,
    7-8) belong to the following word's group on the character side and to no token on the word side."""
    s, t = ends(CHARS, "the cat sat."), ends(WORDS, "the cat sat.")
    assert s == list(range(1, 13)) and t == [3, 7, 11, 12]
    a = align_spans(s, t)
    assert a.student == [0, 3, 7, 11] and a.teacher == [0, 1, 2, 3]
    assert a.student_merged == [[1, 2], [4, 5, 6], [8, 9, 10], []]
    assert a.teacher_merged == [[], [], [], []]
    swapped = align_spans(t, s)  # the other way round: the merges move to the other side
    assert swapped.student == [0, 1, 2, 3] and swapped.teacher_merged == a.student_merged


def test_two_subword_splits_share_some_boundaries():
    """un|believ|able (ends 2, 8, 12) against unbe|liev|able (4, 8, 12): the cuts at 8 and 12 are shared, so
    'unbeliev' is one group merged on both sides and 'able' a one-token group."""
    a_tok = hand_made(["un", "believ", "able"], "un|believ|able")
    b_tok = hand_made(["unbe", "liev", "able"], "unbe|liev|able")
    s, t = ends(a_tok, "unbelievable"), ends(b_tok, "unbelievable")
    assert s == [2, 8, 12] and t == [4, 8, 12]
    a = align_spans(s, t)
    assert (a.student, a.teacher, a.student_merged, a.teacher_merged) == ([0, 2], [0, 2], [[1], []], [[1], []])


def test_byte_pieces_of_one_character_are_not_cut():
    """Byte-level tokenizers give every byte piece of a multi-byte character the character's span."""
    assert boundaries([1, 3, 3, 4]) == {1: 0, 3: 2, 4: 3}
    tok = models.tiny_tokenizer()
    text = "naïve café ☕ über"
    e = ends(tok, text)
    a = align_spans(e, e)
    assert a.student == a.teacher and a.student_merged == a.teacher_merged
    assert len(a) == len(set(e)) < len(e)  # a piece that shares its end with the next is merged into its group
    for first, more in zip(a.student, a.student_merged):
        assert all(e[m] == e[first] or e[m] > e[m - 1] for m in more)


def test_truncation_and_eos():
    """A side cut short compares only up to the last shared boundary; EOS pairs with EOS one past the text."""
    full = encode_text(CHARS, "", "the cat sat.", True, 10_000)
    word = encode_text(WORDS, "", "the cat sat.", True, 10_000)
    assert full.ends[-1] == word.ends[-1] == 13
    a = align_spans(full.ends, word.ends)
    assert (a.student[-1], a.teacher[-1]) == (12, 4)
    cut = encode_text(CHARS, "", "the cat sat.", True, 6)  # "the ca"
    b = align_spans(cut.ends, word.ends)
    assert b.student == [0] and b.teacher == [0]


def test_positions_alignment():
    a = align_positions(5, 3)
    assert a.student == a.teacher == [0, 1, 2] and a.student_merged == [[], [], []]
    assert align("positions", [3, 7], [1, 2, 3]).student == [0, 1]
    with pytest.raises(ValueError, match="unknown alignment"):
        align("nearest", [1], [1])


def test_encode_text_masks_the_prompt():
    enc = encode_text(CHARS, "ab", "cd", True, 10).encoded
    assert enc.input_ids == [CHARS.convert_tokens_to_ids(c) for c in "abcd"] + [CHARS.eos_token_id]
    assert enc.labels == [IGNORE_INDEX, IGNORE_INDEX] + enc.input_ids[2:] and enc.prompt_len == 2


def test_cross_tokenizer_pairs_rows_over_a_batch():
    """Two sequences (char-level student, word-level teacher): pairs index each side's valid-target rows,
    row-major over the batch, and the merged character tokens scale their group's pair."""
    cfg = DistillConfig(technique="kd", loss="uld", max_len=64, progress=False)
    ctx = SimpleNamespace(cfg=cfg, tokenizer=CHARS)
    cross = CrossTokenizer(ctx, WORDS)

    def student(prompt: str, response: str) -> Encoded:
        return encode_text(CHARS, prompt, response, True, 64).encoded

    seqs, batch = cross.pair([student("a:", "the cat"), student("#", "sat.")])
    assert [s.input_ids for s in seqs] == [student("a:", "the cat").input_ids, student("#", "sat.").input_ids]
    # sequence 1: student response rows 0..7 ("the cat" + EOS), teacher rows 0..2 (the, cat, EOS)
    # sequence 2: student rows 8..12 ("sat." + EOS), teacher rows 3..5 (sat, ., EOS)
    assert batch.student_rows.tolist() == [0, 3, 7, 8, 11, 12]
    assert batch.teacher_rows.tolist() == [0, 1, 2, 3, 4, 5]
    rows, pair = batch.student_merge
    assert rows.tolist() == [1, 2, 4, 5, 6, 9, 10] and pair.tolist() == [0, 0, 1, 1, 1, 3, 3]
    assert batch.teacher_merge[0].numel() == 0
    assert [t.input_ids[t.prompt_len:] for t in batch.teacher] == [[2, 3, 0], [4, 5, 0]]
