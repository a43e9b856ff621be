"""MoPe: matches noise added to deep copies, leaves the model bit-identical, same seed same scores, tied noise."""
import copy

import numpy as np
import pytest
import torch

from kdfast import attacks, models
from kdfast.attacks.perturb import Perturbation, noise_seed
from kdfast.data import Encoded, encode, next_token_targets

RECORDS = [
    {"instruction": "Define the noun \"cat\".", "response": "A small domesticated feline mammal with soft fur."},
    {"instruction": "Define it.", "input": "dog", "response": "Canine."},
    {"text": "The quick brown fox jumps over the lazy dog, again and again."},
    {"instruction": "Spell it.", "response": "A"},
]


def mean_ll(model, record, tok):
    # The field's convention: a {"text"} record is tokenizer(text) as it is, its first token unscored.
    item = encode(tok, record) if "text" not in record else Encoded(tok(record["text"])["input_ids"],
                                                                    [-100] + tok(record["text"])["input_ids"][1:], 0)
    logp = torch.log_softmax(model(input_ids=torch.tensor([item.input_ids])).logits.double(), -1)[0]
    targets = next_token_targets(torch.tensor([item.labels]))[0]
    valid = targets != -100
    return logp[valid].gather(-1, targets[valid, None]).mean().item()


def oracle_mope(model, tok, record, n, sigma, seed, prefix=""):
    """mean_i L(θ+ε_i) − L(θ) on deep copies with the noise added in place, parameter by parameter."""
    lls = []
    for i in range(n):
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in noisy.named_parameters():
                if name.startswith(prefix):
                    g = torch.Generator().manual_seed(noise_seed(seed, i, name))
                    p.add_(sigma * torch.randn(p.shape, generator=g))
        lls.append(mean_ll(noisy, record, tok))
    return mean_ll(model, record, tok) - float(np.mean(lls))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}, \
        {n: id(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,side", [("llama", "right"), ("llama", "left"), ("gpt2", "left"), ("opt", "right")])
def test_mope_matches_noisy_copies_and_restores_bit_identical(family, side):
    model, tok = models.tiny_model(family, seed=4), models.tiny_tokenizer()
    values, ids = snapshot(model)
    table = attacks.score(model, tok, RECORDS, ("mope", "mope_block"), mope_n=2, mope_sigma=0.05, seed=9,
                          padding_side=side, batch_tokens=120, progress=False)
    after = model.state_dict(keep_vars=True)
    assert values.keys() == after.keys()
    assert all(torch.equal(values[k], after[k]) for k in values)  # parameters and buffers
    assert ids == {n: id(p) for n, p in model.named_parameters()}  # the same Parameter objects, too
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    block1 = next(n for n, m in model.named_modules() if m is models.transformer_blocks(model)[1]) + "."
    for i, record in enumerate(RECORDS):
        assert table["mope"][i] == pytest.approx(oracle_mope(model, tok, record, 2, 0.05, 9), abs=1e-4)
        assert table["mope_block@1"][i] == pytest.approx(oracle_mope(model, tok, record, 2, 0.05, 9, block1), abs=1e-4)
    assert len([c for c in table.columns if c.startswith("mope_block@")]) == 2


def test_same_seed_same_scores_and_sigma_zero():
    model, tok = models.tiny_model("llama", seed=5), models.tiny_tokenizer()
    run = lambda **kw: attacks.score(model, tok, RECORDS, ("mope",), mope_n=3, progress=False, **kw)["mope"]  # noqa: E731
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert np.allclose(run(mope_sigma=0.0), 0.0, atol=1e-6)


def test_tied_weights_get_the_same_noise():
    model = models.tiny_model("llama", seed=6)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, mod.weight.clone()))
             for name, m in (("embed", model.model.embed_tokens), ("head", model.lm_head))]
    with torch.no_grad(), Perturbation(model, sigma=0.1, seed=3) as perturbation:
        perturbation.index = 0
        model(input_ids=torch.tensor([[5, 6, 7]]))
    for h in hooks:
        h.remove()
    assert torch.equal(seen["embed"], seen["head"])
    assert not torch.equal(seen["head"], model.lm_head.weight)


def test_an_error_mid_forward_restores_the_parameters():
    model = models.tiny_model("llama", seed=7)
    values, ids = snapshot(model)
    boom = model.model.layers[1].register_forward_pre_hook(lambda m, a: 1 / 0)
    with pytest.raises(ZeroDivisionError), torch.no_grad(), Perturbation(model, 0.1) as perturbation:
        perturbation.index = 0
        model(input_ids=torch.tensor([[5, 6, 7]]))
    boom.remove()
    assert ids == {n: id(p) for n, p in model.named_parameters()}
    assert all(torch.equal(values[k], v) for k, v in model.state_dict(keep_vars=True).items())
    assert not model.model.layers[0]._forward_pre_hooks  # the context removed its hooks
