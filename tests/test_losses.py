"""The nn.Module faces: same numbers as the functions, arguments checked at construction."""
import pytest
import torch

import kdfast
from kdfast import reference as ref


def test_distill_loss_module_matches_function_and_reference(gen):
    s = torch.randn(2, 4, 500, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 500, generator=gen)
    labels = torch.randint(0, 500, (2, 4), generator=gen)
    labels[0, 0] = -100
    module = kdfast.DistillLoss(kind="srkl", alpha=0.1, temperature=1.3, scale_by_t2=True)
    got = module(s, t, labels=labels)
    want = kdfast.distill_loss(s, t, "srkl", alpha=0.1, temperature=1.3, labels=labels, scale_by_t2=True)
    oracle = ref.distill_loss(s.double(), t.double(), "srkl", alpha=0.1, temperature=1.3, labels=labels,
                              scale_by_t2=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(got.double(), oracle, rtol=1e-5, atol=1e-7)
    got.backward()
    assert s.grad is not None and s.grad.shape == s.shape
    assert "srkl" in repr(module) and list(module.parameters()) == [] and module.state_dict() == {}


def test_fused_linear_module_matches_function(gen):
    h, w = torch.randn(40, 16, generator=gen), torch.randn(300, 16, generator=gen)
    ht, wt = torch.randn(40, 24, generator=gen), torch.randn(300, 24, generator=gen)
    labels = torch.randint(0, 300, (40,), generator=gen)
    module = kdfast.FusedLinearDistillLoss(kind="jsd", beta=0.1, hard_weight=0.5, soft_weight=0.5, chunk_size=16)
    got = module(h, w, ht, wt, labels)
    want = kdfast.fused_linear_distill_loss(h, w, ht, wt, labels, kind="jsd", beta=0.1, hard_weight=0.5,
                                            soft_weight=0.5)
    logits = h.double() @ w.double().t()
    oracle = (0.5 * ref.cross_entropy(logits, labels)
              + 0.5 * ref.distill_loss(logits, ht.double() @ wt.double().t(), "jsd", beta=0.1, labels=labels))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.double(), oracle, rtol=1e-5, atol=1e-6)
    assert "hard_weight=0.5" in repr(module)


@pytest.mark.parametrize("cls", [kdfast.DistillLoss, kdfast.FusedLinearDistillLoss])
@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="kld"), r"unknown divergence kind 'kld'"),
    (dict(beta=2.0), r"beta must lie in \[0, 1\]"),
    (dict(temperature=-1.0), r"temperature must be a positive"),
    (dict(vocab="pad"), r"unknown vocab policy 'pad'"),
    (dict(backend="cuda"), r"unknown backend 'cuda'"),
    (dict(reduction="batchmean"), r"unknown reduction 'batchmean'"),
])
def test_bad_construction_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


V = 11


def _label_ops(gen):
    """Every op that takes labels, on [2, 3] positions of a V-entry vocabulary (hidden size 8 for the fused ones)."""
    s, t = torch.randn(2, 3, V, generator=gen), torch.randn(2, 3, V, generator=gen)
    hs, ht, w = (torch.randn(*shape, generator=gen) for shape in ((2, 3, 8), (2, 3, 8), (V, 8)))
    return {
        "distill_loss": lambda y: kdfast.distill_loss(s, t, labels=y),
        "distill_loss reference": lambda y: kdfast.distill_loss(s, t, labels=y, backend="reference"),
        "DistillLoss": lambda y: kdfast.DistillLoss()(s, t, labels=y),
        "fused_linear_distill_loss": lambda y: kdfast.fused_linear_distill_loss(hs, w, ht, w, y),
        "fused, hard_weight 0.5": lambda y: kdfast.fused_linear_distill_loss(hs, w, ht, w, y, hard_weight=0.5),
        "token_stats": lambda y: kdfast.token_stats(s, y),
        "token_stats torch": lambda y: kdfast.token_stats(s, y, backend="torch"),
        "token_stats_from_hidden": lambda y: kdfast.token_stats_from_hidden(hs, w, y),
    }


@pytest.mark.parametrize("bad", [V, -5])
def test_one_label_check_everywhere(gen, bad):
    """A label outside [0, V) that is not ignore_index (-100) is refused by every op with one message (distill_loss
    used to count it as a valid position while token_stats and the fused loss raised)."""
    labels = torch.tensor([[1, 2, -100], [3, bad, 0]])
    want = (f"label {bad} at position (1, 1) is neither a token id in [0, {V}) (the vocabulary used) nor "
            "ignore_index=-100; mask positions with -100 or pass the ignore_index your labels use")
    for name, op in _label_ops(gen).items():
        op(labels.where(labels != bad, 4))  # the same call with a valid label runs
        with pytest.raises(ValueError) as caught:
            op(labels)
        assert str(caught.value) == want, name
