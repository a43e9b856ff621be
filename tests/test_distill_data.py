"""Trainer data: validated encoding with clear errors, collation to next-token targets, the sharded resumable order."""
import pytest

from kdfast.data import IGNORE_INDEX, RecordError
from kdfast.distill import DistillError
from kdfast.distill.data import DataStream, collate, count_targets, encode_texts, encode_training, with_response
from kdfast.models import tiny_tokenizer

RECORDS = [{"instruction": "Define the noun \"cat\".", "response": "a small domesticated feline"},
           {"instruction": "Define the verb \"run\".", "input": "as in racing", "response": "move fast on foot"}]


def test_encode_masks_prompt_and_appends_eos():
    tok = tiny_tokenizer()
    enc = encode_training(tok, RECORDS, max_len=160, max_prompt_len=120, long_prompts="error")
    for e in enc:
        assert e.labels[: e.prompt_len] == [IGNORE_INDEX] * e.prompt_len
        assert e.labels[-1] == e.input_ids[-1] == tok.eos_token_id
    assert count_targets(enc) == sum(len(e) - e.prompt_len for e in enc)


def test_bad_records_raise_named_errors():
    tok = tiny_tokenizer()
    with pytest.raises(RecordError, match="training record 1: empty response"):
        encode_training(tok, [RECORDS[0], {"instruction": "x", "response": "  "}], 128, 100, "error")
    with pytest.raises(RecordError, match=r"record 0: prompt has \d+ tokens > max_prompt_len=20"):
        encode_training(tok, RECORDS, 128, 20, "error")
    with pytest.raises(RecordError, match="training record 0 is a {'text'} record"):
        encode_training(tok, [{"text": "plain text"}], 128, 100, "error")
    with pytest.raises(RecordError, match="lm record 0 has no 'text'"):
        encode_texts(tok, RECORDS[:1], 128)
    with pytest.raises(DistillError, match="no training records"):
        encode_training(tok, [], 128, 100, "error")


def test_drop_long_warns_with_count():
    tok = tiny_tokenizer()
    long = {"instruction": "Define " + "very " * 60 + "long words.", "response": "x"}
    with pytest.warns(UserWarning, match="dropped 1 of 3 training records"):
        enc = encode_training(tok, [long] + RECORDS, max_len=160, max_prompt_len=120, long_prompts="drop")
    assert len(enc) == 2
    with pytest.raises(RecordError, match="every training record"):
        encode_training(tok, [long], max_len=160, max_prompt_len=120, long_prompts="drop")


def test_collate_aligns_targets_and_with_response_masks_prompt():
    tok = tiny_tokenizer()
    enc = encode_training(tok, RECORDS, 160, 120, "error")
    batch = collate(enc, tok.pad_token_id, "cpu")
    for b, e in enumerate(enc):
        targets = batch["targets"][b]
        assert targets[: e.prompt_len - 1].eq(IGNORE_INDEX).all()
        assert targets[e.prompt_len - 1: len(e) - 1].tolist() == e.input_ids[e.prompt_len:]
        assert targets[len(e) - 1:].eq(IGNORE_INDEX).all()
    new = with_response(enc[0], [5, 6, 7, 8], max_len=enc[0].prompt_len + 2)
    assert new.input_ids[new.prompt_len:] == [5, 6] and new.labels == [IGNORE_INDEX] * new.prompt_len + [5, 6]


def test_stream_shards_cover_the_same_records_and_resume():
    one = DataStream(10, seed=3)
    two = [DataStream(10, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(7):   # crosses epochs (10 // 4 = 2 chunks of 4 per epoch)
        assert sorted(one.take(4)) == sorted(two[0].take(2) + two[1].take(2))
    assert one.epoch == two[0].epoch == 3
    epoch0 = DataStream(10, seed=3)
    seen = epoch0.take(4) + epoch0.take(4)
    assert len(set(seen)) == 8
    copy = DataStream(10, seed=3)
    copy.load_state_dict(one.state_dict())
    assert copy.take(4) == one.take(4)
    with pytest.raises(DistillError, match="cannot fill a batch"):
        DataStream(3, seed=0, world=2).take(2)
