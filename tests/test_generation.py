"""Batched generation: independent of batch composition, seeded sampling reproducible, EOS cut."""
import pytest
from torch import nn

from kdfast import models
from kdfast.data import prompt_text
from kdfast.generation import _cut_after_eos, eval_mode, generate, pad_token_id


@pytest.mark.parametrize("family", models.FAMILIES)
def test_batched_equals_one_by_one(family):
    tok, model = models.tiny_tokenizer(), models.tiny_model(family, seed=0)
    prompts = [tok(prompt_text({"instruction": "Define " + "x " * i, "response": "y"}))["input_ids"] for i in range(5)]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    batched = generate(model, prompts, 6, batch_size=5, **kw)
    assert batched == [generate(model, [p], 6, **kw)[0] for p in prompts]
    s1 = generate(model, prompts, 6, do_sample=True, seed=7, **kw)
    assert s1 == generate(model, prompts, 6, do_sample=True, seed=7, **kw)


def test_cut_after_eos():
    assert _cut_after_eos([5, 6, 0, 7, 0], 0) == [5, 6, 0]
    assert _cut_after_eos([5, 6], 0) == [5, 6]


def test_eval_mode_turns_every_model_to_eval_and_restores_each_mode():
    training, evaluating = nn.Dropout().train(), nn.Dropout().eval()
    with pytest.raises(RuntimeError), eval_mode(training, evaluating):
        assert not training.training and not evaluating.training
        raise RuntimeError  # the modes come back on an error too
    assert training.training and not evaluating.training


def test_pad_token_id_falls_back_to_eos():
    tok = models.tiny_tokenizer()
    assert pad_token_id(tok) == tok.pad_token_id is not None
    tok.pad_token = None
    assert pad_token_id(tok) == tok.eos_token_id is not None
