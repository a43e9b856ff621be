"""The oracle itself: autograd-checked, and pinned to closed forms on tiny cases."""
import math

import pytest
import torch

from kdfast import reference as ref


@pytest.mark.parametrize("kind", ref.KINDS)
@pytest.mark.parametrize("beta,alpha", [(0.5, 0.1), (0.1, 0.5)])
def test_gradcheck(kind, beta, alpha, gen):
    s = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    if kind == "tvd":  # |p − q| is not differentiable where p == q; random inputs stay away from it
        assert (torch.softmax(s, -1) - torch.softmax(t, -1)).abs().min() > 1e-6
    fn = lambda a, b: ref.divergence(a, b, kind, beta=beta, alpha=alpha, temperature=1.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))


def test_closed_forms():
    s = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # q = (1/4, 3/4)
    t = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # p = (1/2, 1/2)
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)
    fkl = (p * (p / q).log()).sum()
    rkl = (q * (q / p).log()).sum()
    m = 0.3 * p + 0.7 * q
    jsd = 0.3 * (p * (p / m).log()).sum() + 0.7 * (q * (q / m).log()).sum()
    skl = (p * (p / (0.1 * p + 0.9 * q)).log()).sum()
    srkl = (q * (q / (0.9 * p + 0.1 * q)).log()).sum()
    expect = {"fkl": fkl, "rkl": rkl, "jsd": jsd, "skl": skl, "srkl": srkl, "tvd": torch.tensor(0.25)}
    for kind, value in expect.items():
        got = ref.divergence(s, t, kind, beta=0.3, alpha=0.1)
        assert got.item() == pytest.approx(value.item(), rel=1e-12), kind


def test_endpoints_and_masking():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 9, dtype=torch.float64, generator=g), torch.randn(4, 9, dtype=torch.float64, generator=g)
    assert torch.equal(ref.divergence(s, t, "jsd", beta=0.0), ref.divergence(s, t, "fkl"))
    assert torch.equal(ref.divergence(s, t, "jsd", beta=1.0), ref.divergence(s, t, "rkl"))
    assert torch.equal(ref.divergence(s, t, "skl", alpha=0.0), ref.divergence(s, t, "fkl"))
    assert torch.equal(ref.divergence(s, t, "srkl", alpha=0.0), ref.divergence(s, t, "rkl"))
    assert torch.equal(ref.divergence(s, s, "tvd"), torch.zeros(4, dtype=torch.float64))
    s[:, -2:] = -math.inf
    t[:, -1] = -math.inf
    s.requires_grad_(True)
    for kind in ref.KINDS:
        out = ref.distill_loss(s, t, kind, labels=torch.tensor([1, -100, 2, 3]))
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(grad).all(), kind
        assert (grad[1] == 0).all()
    none = ref.distill_loss(s, t, "fkl", labels=torch.full((4,), -100))
    assert none.item() == 0.0


def test_token_stats_and_min_k():
    z = torch.tensor([[1.0, 3.0, 3.0, -math.inf], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    st = ref.token_stats(z, torch.tensor([1, -100]))
    p = torch.softmax(z[0], -1)[:3]
    assert st["logp"][0].item() == pytest.approx(math.log(p[1].item()))
    assert st["entropy"][0].item() == pytest.approx(-(p * p.log()).sum().item())
    assert st["top1"].tolist() == [True, False] and st["lse"][1] == 0
    values = torch.tensor([[5.0, 1.0, 3.0, 2.0], [7.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    out = ref.min_k(values, mask, ks=(0.1, 0.5, 1.0))
    assert out.tolist() == [[1.0, 2.0, 3.0], [7.0, 7.0, 7.0]]
    assert ref.min_k_count(0.1, 30) == 3 and ref.min_k_count(0.2, 4) == 1
