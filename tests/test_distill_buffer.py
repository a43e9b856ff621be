"""Replay buffer: FIFO capacity, sampling without replacement, tensor round trip for checkpoints."""
import random

from kdfast.data import Encoded
from kdfast.distill.buffer import ReplayBuffer, pack_sequences, unpack_sequences


def _seq(i: int) -> Encoded:
    return Encoded(list(range(i, i + 3 + i % 4)), [-100] * 2 + list(range(i + 2, i + 3 + i % 4)), 2)


def test_fifo_capacity_and_sampling():
    buf = ReplayBuffer(capacity=5)
    buf.push([_seq(i) for i in range(8)])
    assert len(buf) == 5 and buf.full
    assert [s.input_ids[0] for s in buf.items] == [3, 4, 5, 6, 7]   # the oldest left first
    drawn = buf.sample(4, random.Random(0))
    assert len({tuple(s.input_ids) for s in drawn}) == 4
    assert len(buf.sample(10, random.Random(0))) == 5


def test_tensor_round_trip():
    buf = ReplayBuffer(capacity=10)
    buf.push([_seq(i) for i in range(6)])
    again = ReplayBuffer(capacity=10)
    again.load_state_tensors(buf.state_tensors())
    assert list(again.items) == list(buf.items)
    assert unpack_sequences(pack_sequences([], "x"), "x") == []
